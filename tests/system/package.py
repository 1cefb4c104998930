"""The Debian package for the system tier: `make deb`'s build of this
checkout, and the build an upgrade starts from.

No earlier release was ever packaged, so "the previous build" is this build
with its version lowered (`<version>~prev`, which dpkg orders before
`<version>`): installing the real build over it is a real dpkg upgrade (the
old prerm, the files replaced under the running agent, the new postinst and
debhelper's restart), which is what the tier checks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from machine import PREFIX, ROOT


def build(out: Path) -> Path:
    """`make deb` (scripts/deb.sh: dpkg-buildpackage, then lintian) into out."""
    env = dict(os.environ, SMTPGUARD_DEB_OUT=str(out))
    r = subprocess.run([str(ROOT / "scripts/deb.sh")], env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise AssertionError(f"scripts/deb.sh failed:\n{r.stderr[-4000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def lowered(deb: Path, out: Path) -> Path:
    """The same package with its version lowered to <version>~prev."""
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-deb-"))
    try:
        tree = work / "tree"
        subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
        control = tree / "DEBIAN/control"
        text = control.read_text()
        version = re.search(r"^Version: (\S+)$", text, re.M)
        assert version, text
        prev = f"{version[1]}~prev"
        control.write_text(text.replace(f"Version: {version[1]}", f"Version: {prev}"))
        target = out / f"smtpguard_{prev}_amd64.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "-b", str(tree),
                        str(target)], check=True, capture_output=True)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)
