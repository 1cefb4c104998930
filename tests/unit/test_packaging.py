"""The Debian package's sources agree with the project: one version, the
pinned dependencies cover pyproject.toml's, and the system tier's image
holds every package the .deb depends on (its apt has no mirror)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from smtpguard import __version__

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"
# Taken from Debian instead of the venv (debian/control; scripts/deb.sh --lock).
FROM_DEBIAN = {"pyyaml": "python3-yaml"}


def pins() -> dict[str, Version]:
    out = {}
    for line in (DEBIAN / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"debian/requirements.txt: not pinned: {line}"
            out[canonicalize_name(name)] = Version(version)
    return out


def depends() -> list[str]:
    control = (DEBIAN / "control").read_text()
    block = re.search(r"^Package: smtpguard$.*?^Depends:(.*?)^\S", control, re.M | re.S)
    assert block, control
    names = [d.strip().split()[0] for d in block[1].replace("\n", " ").split(",") if d.strip()]
    return [n for n in names if not n.startswith("${")]


def test_changelog_names_the_version_the_package_says() -> None:
    top = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert re.match(rf"smtpguard \({re.escape(__version__)}\) ", top), top


def test_readme_installs_this_version() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"apt install ./smtpguard_{__version__}_amd64.deb" in readme
    assert not set(re.findall(r"smtpguard_(\d[^_]*)_amd64", readme)) - {__version__}


def test_every_dependency_is_pinned_in_a_version_it_accepts() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name in FROM_DEBIAN:
            assert FROM_DEBIAN[name] in depends(), f"{req.name} comes from {FROM_DEBIAN[name]}"
            assert name not in pinned, f"{req.name} is Debian's: not in the venv"
            continue
        assert name in pinned, f"{req.name} is not pinned in debian/requirements.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (spec, pinned[name])


def test_the_system_image_holds_every_dependency() -> None:
    script = (ROOT / "scripts/system-image.sh").read_text()
    setup = (ROOT / "scripts/setup.sh").read_text()
    words = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", script + setup))
    missing = [d for d in depends() if d not in words]
    assert not missing, f"the system image lacks {missing} (scripts/system-image.sh)"


def test_the_purge_removes_what_the_agent_names() -> None:
    """The postrm cleans up in shell (the agent is gone by then): it must name
    the filters, tables, chains, comments, ipsets and pins the agent makes."""
    from smtpguard.datapath import attach
    from smtpguard.defaults import DEFAULT_PIN_DIR
    from smtpguard.enforce import ipset_state, nft_chains
    from smtpguard.enforce.iptables_render import PREFIX
    from smtpguard.enforce.iptables_rule import COMMENT

    postrm = (DEBIAN / "smtpguard.postrm").read_text()
    assert f"grep -q ' {attach.NAME_PREFIX}'" in postrm
    assert f"pref {attach.PRIO} handle {attach.HANDLE:#x} bpf" in postrm
    assert f'[ "$name" = {nft_chains.TABLE} ]' in postrm
    assert f"-e {PREFIX} -e '\"{COMMENT} '" in postrm
    assert all(s.startswith(PREFIX) for s in ipset_state.all_names())
    assert f"for set in {' '.join(sorted(ipset_state.all_names()))}; do" in postrm
    assert f"rm -rf {DEFAULT_PIN_DIR.parent} " in postrm
