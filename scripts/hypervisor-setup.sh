#!/usr/bin/env bash
# What the real-hypervisor test tier (tests/hypervisor) needs, idempotently.
# Quiet when nothing is missing; run as root (the tier's conftest runs it).
#
#   - libvirt (daemon, QEMU driver, clients, Python binding) and QEMU for x86,
#     installed without starting any service (policy-rc.d refuses starts).
#     The `default` NAT network these packages define never reaches the tests:
#     their libvirtd has a private /etc/libvirt (no virbr0, no NAT rules);
#   - for the guest only, downloaded with `apt-get download` and unpacked
#     under $CACHE (not installed): Debian's cloud kernel and busybox-static.
set -euo pipefail

CACHE=${SMTPGUARD_TEST_CACHE:-/var/cache/smtpguard-test}
KERNEL_META=linux-image-cloud-amd64
APT_PACKAGES=(
	libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients python3-libvirt
	qemu-system-x86
)

say() { printf 'hypervisor-setup: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root"

apt_updated=0
apt_update() {
	if [ "$apt_updated" -eq 0 ]; then
		apt-get update -qq >/dev/null
		apt_updated=1
	fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# Debian's maintainer scripts start libvirtd, virtlogd and polkitd through
# invoke-rc.d; exit 101 from policy-rc.d tells it "not now" (as setup.sh does
# for Prometheus). The tests start the daemons they need themselves.
packages() {
	local missing=() p guard=/usr/sbin/policy-rc.d log=/tmp/smtpguard-hv-apt.log
	for p in "${APT_PACKAGES[@]}"; do
		installed "$p" || missing+=("$p")
	done
	[ "${#missing[@]}" -gt 0 ] || return 0
	apt_update
	if [ ! -e "$guard" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$guard"
		chmod +x "$guard"
		trap 'rm -f /usr/sbin/policy-rc.d' EXIT # also when interrupted
	fi
	say "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		"${missing[@]}" >"$log" 2>&1 ||
		{ cat "$log" >&2; die "apt-get install ${missing[*]} failed"; }
}

# Guest-only packages (the kernel, busybox) are unpacked, never installed:
# into $CACHE/NAME/<package>_<version>/ with a .complete stamp, replacing an
# older version. So the host's /boot stays as it is (installing busybox-static
# alone makes initramfs-tools rebuild the host's initrd: 12 s here).
unpack() { # NAME PACKAGE
	local name=$1 pkg=$2 ver dir tmp
	ver=$(candidate "$pkg")
	[ -n "$ver" ] || { apt_update; ver=$(candidate "$pkg"); }
	[ -n "$ver" ] || die "no $pkg in the package lists"
	dir=$CACHE/$name/${pkg}_$ver
	[ -e "$dir/.complete" ] && return 0
	say "unpacking $pkg $ver into $dir"
	mkdir -p "$CACHE/$name"
	tmp=$(mktemp -d "$CACHE/$name/.download.XXXXXX")
	if ! (cd "$tmp" && apt-get download -qq "$pkg=$ver" >/dev/null 2>&1); then
		apt_update
		(cd "$tmp" && apt-get download -qq "$pkg=$ver" >/dev/null) ||
			{ rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
	fi
	dpkg-deb -x "$tmp"/*.deb "$tmp/root"
	find "$CACHE/$name" -mindepth 1 -maxdepth 1 -not -name '.*' -exec rm -rf {} +
	mv "$tmp/root" "$dir"
	rm -rf "$tmp"
	touch "$dir/.complete"
}

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2}'; }

# The kernel package the cloud metapackage points at (linux-image-6.1.0-N-cloud-amd64).
kernel_package() {
	local pkg
	pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
	if [ -z "$pkg" ]; then
		apt_update
		pkg=$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-/{print $2; exit}')
	fi
	[ -n "$pkg" ] || die "$KERNEL_META names no linux-image package"
	echo "$pkg"
}

packages
unpack kernel "$(kernel_package)"
unpack busybox busybox-static
