#!/usr/bin/env bash
# Build the Debian package (what `make deb` runs), as root on Debian 12:
#   scripts/deb.sh            build/deb/smtpguard_<version>_amd64.deb, then lintian
#   scripts/deb.sh --lock     rewrite debian/requirements.txt from pyproject.toml
# A build installs its tools first (debhelper, dh-virtualenv, lintian). Builds
# from a copy of the checkout's files (tracked and untracked, not ignored), so
# the work tree gets no build products; pip reaches PyPI (or the host's pip
# configuration) for the pinned wheels. Fails on any lintian error; the
# warnings kept are in debian/smtpguard.lintian-overrides, each with its reason.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${SMTPGUARD_DEB_OUT:-$ROOT/build/deb}
BUILD_PACKAGES=(debhelper dh-virtualenv lintian dpkg-dev python3-venv python3-dev)

say() { printf 'deb: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

tools() {
	local missing=() p
	for p in "${BUILD_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
	[ "${#missing[@]}" -gt 0 ] || return 0
	[ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]}"
	say "installing ${missing[*]}"
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		"${missing[@]}" >/tmp/smtpguard-deb-apt.log 2>&1 ||
		{ cat /tmp/smtpguard-deb-apt.log >&2; die "apt-get install ${missing[*]} failed"; }
}

WORK=  # the scratch directory, removed however the script ends
trap '[ -z "$WORK" ] || rm -rf "$WORK"' EXIT

# The pins: what pip resolves for the agent alone, in a venv without
# system packages (so a Debian-provided module never hides a dependency),
# less what the package takes from Debian (debian/control: python3-yaml).
DEBIAN_PROVIDED='^(pyyaml)=='

lock() {
	local tmp
	WORK=$(mktemp -d)
	tmp=$WORK
	/usr/bin/python3 -m venv "$tmp/venv"
	"$tmp/venv/bin/pip" install -q --disable-pip-version-check "$ROOT" 2>&1 |
		grep -v '^WARNING: Location' >&2 || true
	{
		sed -n '1,3p' "$ROOT/debian/requirements.txt"
		"$tmp/venv/bin/pip" freeze --exclude-editable | grep -v '^smtpguard[ =@]' |
			grep -v -i -E "$DEBIAN_PROVIDED"
	} >"$tmp/requirements.txt"
	mv "$tmp/requirements.txt" "$ROOT/debian/requirements.txt"
	say "debian/requirements.txt: $(grep -c '==' "$ROOT/debian/requirements.txt") pins"
}

build() {
	local version deb
	version=$(dpkg-parsechangelog -l "$ROOT/debian/changelog" -S Version)
	WORK=$(mktemp -d /tmp/smtpguard-deb.XXXXXX)
	local work=$WORK
	mkdir "$work/smtpguard"
	(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
		while IFS= read -r -d '' f; do
			[ -f "$f" ] || continue  # deleted in the work tree
			cp --parents -p "$f" "$work/smtpguard/"
		done) || die "copying the checkout"
	say "building smtpguard $version in $work"
	(cd "$work/smtpguard" && dpkg-buildpackage -b -us -uc >"$work/build.log" 2>&1) ||
		{ tail -60 "$work/build.log" >&2; die "dpkg-buildpackage failed ($work/build.log)"; }
	deb=smtpguard_${version}_amd64.deb
	mkdir -p "$OUT"
	mv "$work/$deb" "$OUT/$deb"
	say "lintian $deb"
	lintian --fail-on error "$OUT/$deb" >&2 ||
		die "lintian reports errors"
	echo "$OUT/$deb"
}

if [ "${1:-}" = "--lock" ]; then
	lock
else
	tools
	build
fi
