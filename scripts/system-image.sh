#!/usr/bin/env bash
# The system test tier's machine (tests/system), idempotently; run as root.
#
#   scripts/system-image.sh          prints the image directory (built if missing)
#
# A Debian 12 system built from Debian packages with mmdebstrap: systemd as
# PID 1, Debian's own cloud kernel with its matching linux-headers package
# (so bcc compiles the normal way, no headers fallback), qemu-guest-agent (the
# tests' way in: no network, no ssh), and the Debian packages scripts/setup.sh
# installs, so `make install` in the guest finds them and needs no mirror.
# Also Open vSwitch (openvswitch-switch; Debian's kernel has openvswitch.ko,
# these hosts' own kernel has not) for the OVS tests (tests/system/test_ovs.py);
# its units are installed disabled, so a machine boots as before and a test
# that wants OVS starts it (`systemctl start openvswitch-switch`).
# Cached in $CACHE/system/<key>/ (key: this script and setup.sh's package
# list), as a raw ext4 image (mke2fs -d, no loop mount) with the kernel and
# initrd beside it. Tests boot it through a qcow2 overlay: it stays pristine.
#
# Also the host's side: QEMU, qemu-img, mmdebstrap; and a wheelhouse of the
# project's Python dependencies ($CACHE/system/wheels/, from the host's
# own pip configuration) for the guest's pip, which has no index to reach.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${SMTPGUARD_TEST_CACHE:-/var/cache/smtpguard-test}/system
SUITE=bookworm
HOST_PACKAGES=(mmdebstrap qemu-system-x86 qemu-utils e2fsprogs)
GUEST_PACKAGES=(
	systemd-sysv udev kmod procps iproute2 initramfs-tools make python3
	linux-image-cloud-amd64 linux-headers-cloud-amd64 qemu-guest-agent
	openvswitch-switch
	# What the Debian package depends on beyond setup.sh's list (debian/control):
	# `apt install ./smtpguard_*.deb` in the machine has no mirror to reach.
	python3-yaml ipset
)

say() { printf 'system-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

host_packages() {
	local missing=() p
	for p in "${HOST_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
	[ "${#missing[@]}" -gt 0 ] || return 0
	say "installing ${missing[*]}"
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		"${missing[@]}" >/tmp/smtpguard-system-apt.log 2>&1 ||
		{ cat /tmp/smtpguard-system-apt.log >&2; die "apt-get install ${missing[*]} failed"; }
}

# setup.sh's own list, so the guest has what `make install` checks for.
setup_packages() {
	sed -n '/^APT_PACKAGES=(/,/^)/p' "$ROOT/scripts/setup.sh" | sed '1d;$d' | tr -s ' \t\n' ' '
}

image() {
	local key dir tmp rootfs pkgs
	pkgs=$(echo "${GUEST_PACKAGES[*]}" "$(setup_packages)" | xargs -n1 | sort -u | xargs)
	# This script's text, not its path: make runs it as scripts/system-image.sh,
	# the tests by its absolute path, and both must find the same image.
	key=$(printf '%s\n%s\n' "$pkgs" "$(sha256sum <"$0")" | sha256sum | cut -c1-12)
	dir=$CACHE/$SUITE-$key
	if [ -e "$dir/.complete" ]; then
		echo "$dir"
		return 0
	fi
	say "building $dir (mmdebstrap $SUITE: $pkgs)"
	mkdir -p "$CACHE"
	tmp=$(mktemp -d "$CACHE/.build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	rootfs=$tmp/rootfs
	local t0=$SECONDS
	# policy-rc.d inside the chroot (mmdebstrap's default) keeps services
	# from starting while packages install.
	mmdebstrap --variant=minbase --quiet --include="${pkgs// /,}" \
		--customize-hook='echo smtpguard-system >"$1/etc/hostname"' \
		--customize-hook='printf "/dev/vda / ext4 rw,errors=remount-ro 0 1\n" >"$1/etc/fstab"' \
		--customize-hook='rm -f "$1/etc/machine-id"; touch "$1/etc/machine-id"' \
		--customize-hook='chroot "$1" systemctl mask getty@tty1.service' \
		--customize-hook='chroot "$1" systemctl disable openvswitch-switch.service' \
		"$SUITE" "$rootfs" >"$tmp/mmdebstrap.log" 2>&1 ||
		{ tail -40 "$tmp/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
	say "mmdebstrap: $((SECONDS - t0)) s"
	local kernel
	kernel=$(find "$rootfs/boot" -name 'vmlinuz-*' | sort -V | tail -n1)
	[ -n "$kernel" ] || die "no kernel in the image"
	local krel=${kernel##*/vmlinuz-}
	[ -e "$rootfs/usr/src/linux-headers-$krel/Makefile" ] && [ -L "$rootfs/lib/modules/$krel/build" ] ||
		die "no headers for $krel in the image (linux-headers-cloud-amd64)"
	install -m 0644 "$kernel" "$tmp/vmlinuz"
	install -m 0644 "$rootfs/boot/initrd.img-$krel" "$tmp/initrd.img"
	echo "$krel" >"$tmp/kernel-release"
	t0=$SECONDS
	mke2fs -q -t ext4 -L smtpguard-root -d "$rootfs" "$tmp/root.img" 6G ||
		die "mke2fs failed"
	say "mke2fs: $((SECONDS - t0)) s"
	rm -rf "$rootfs"
	find "$CACHE" -mindepth 1 -maxdepth 1 -name "$SUITE-*" -exec rm -rf {} +
	mv "$tmp" "$dir"
	trap - EXIT
	touch "$dir/.complete"
	echo "$dir"
}

# Wheels for every Python package the project installs (and setuptools, to
# build it), from the host's pip configuration; keyed by pyproject.toml.
wheels() {
	local key dir=$CACHE/wheels tmp
	key=$(sha256sum "$ROOT/pyproject.toml" | cut -c1-12)
	[ "$(cat "$dir/.complete" 2>/dev/null)" = "$key" ] && return 0
	say "collecting wheels into $dir"
	tmp=$(mktemp -d "$CACHE/.wheels.XXXXXX")
	/usr/bin/python3 -m pip wheel -q --disable-pip-version-check -w "$tmp" \
		"setuptools>=66" wheel "$ROOT[dev]" >"$tmp/.log" 2>&1 ||
		{ grep -v '^WARNING: Location' "$tmp/.log" >&2; rm -rf "$tmp"; die "pip wheel failed"; }
	rm -f "$tmp"/smtpguard-* "$tmp/.log"
	rm -rf "$dir"
	mv "$tmp" "$dir"
	echo "$key" >"$dir/.complete"
}

host_packages
mkdir -p "$CACHE"
wheels
image
