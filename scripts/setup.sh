#!/usr/bin/env bash
# Install everything smtpguard needs on a fresh Debian host, idempotently.
# Quiet when nothing is missing; run as root (CI and `make setup` do).
#
#   scripts/setup.sh            system packages, kernel headers, venv at .venv/
#   scripts/setup.sh --system   system packages and kernel headers only
#   scripts/setup.sh --test     everything, plus what the tests use (Prometheus,
#                               promtool, etcd, Open vSwitch's ovsdb-server and
#                               ovs-vsctl), installed without starting services
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
APT_PACKAGES=(
	python3-bpfcc bpfcc-tools nftables python3-nftables iptables bpftool
	iproute2 python3-venv python3-pip iperf3 python3-libvirt python3-systemd
)

say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
	[ "$(id -u)" -eq 0 ] || die "$1 needs root (run: sudo make setup)"
}

apt_updated=0
apt_install() {
	need_root "installing $*"
	if [ "$apt_updated" -eq 0 ]; then
		apt-get update -qq >/dev/null
		apt_updated=1
	fi
	say "installing $*"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/tmp/smtpguard-apt.log 2>&1 ||
		{ cat /tmp/smtpguard-apt.log >&2; die "apt-get install $* failed"; }
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

system_packages() {
	local missing=()
	for p in "${APT_PACKAGES[@]}"; do
		installed "$p" || missing+=("$p")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		apt_install "${missing[@]}"
	fi
}

# bcc compiles against /lib/modules/$(uname -r)/build. Hosts running a Debian
# kernel get the matching headers package; kernels without one (these 6.18
# machines) get the newest Debian cloud headers, linked in place: tc programs
# use only stable UAPI structures, so this compiles and loads.
kernel_headers() {
	local krel moddir arch pkg ver
	krel=$(uname -r)
	moddir=/lib/modules/$krel
	[ -e "$moddir/build/Makefile" ] && return 0
	need_root "installing kernel headers"
	if [ "$apt_updated" -eq 0 ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
	if apt-cache show "linux-headers-$krel" >/dev/null 2>&1; then
		apt_install "linux-headers-$krel"
		[ -e "$moddir/build/Makefile" ] && return 0
	fi
	arch=$(dpkg --print-architecture)
	pkg=$(apt-cache search --names-only "^linux-headers-[0-9].*-cloud-$arch\$" |
		awk '{print $1}' | sort -V | tail -n1)
	[ -n "$pkg" ] || die "no linux-headers-$krel and no linux-headers-*-cloud-$arch package to fall back on"
	installed "$pkg" || apt_install "$pkg"
	ver=${pkg#linux-headers-}
	ver=${ver%-cloud-$arch}
	[ -d "/usr/src/linux-headers-$ver-cloud-$arch" ] || die "$pkg installed no /usr/src/linux-headers-$ver-cloud-$arch"
	mkdir -p "$moddir"
	ln -sfn "/usr/src/linux-headers-$ver-cloud-$arch" "$moddir/build"
	ln -sfn "/usr/src/linux-headers-$ver-common" "$moddir/source"
	say "kernel $krel has no headers package; linked $pkg in $moddir/build"
}

venv() {
	local stamp want
	# A venv counts once it was made whole (the marker, written last): one
	# interrupted while it was made (a python but no pip) is made again.
	if [ ! -f "$VENV/.smtpguard-venv" ]; then
		if [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/pip" ]; then
			: # made whole before the marker existed
		else
			[ ! -e "$VENV" ] || say "removing the unfinished venv at $VENV"
			rm -rf "$VENV"
			say "creating venv at $VENV"
			/usr/bin/python3 -m venv --system-site-packages "$VENV"
		fi
		touch "$VENV/.smtpguard-venv"
	fi
	# Reinstall only when the dependency list changed.
	want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
	stamp=$VENV/.smtpguard-deps
	if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x "$VENV/bin/smtpguard" ]; then
		say "installing Python dependencies into $VENV"
		"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
		echo "$want" >"$stamp"
	fi
	"$VENV/bin/python" -c 'import bcc, nftables' 2>/dev/null ||
		die "the venv cannot import bcc/nftables (Debian python3-bpfcc, python3-nftables)"
}

# Prometheus, etcd, Open vSwitch, Vagrant and openssl for the tests only. The
# Prometheus, etcd and Open vSwitch packages would start servers (:9090, :2379,
# ovsdb-server and ovs-vswitchd), so service starts are refused while they
# install; the tests start their own on loopback or a private socket.
test_packages() {
	local missing=() p
	installed vagrant || apt_install vagrant
	installed openssl || apt_install openssl # the fleet's TLS test makes its certificates
	for p in prometheus etcd-server openvswitch-switch; do installed "$p" || missing+=("$p"); done
	[ "${#missing[@]}" -gt 0 ] || return 0
	need_root "installing ${missing[*]}"
	local guard=/usr/sbin/policy-rc.d created=0
	if [ ! -e "$guard" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$guard"
		chmod +x "$guard"
		created=1
	fi
	apt_install "${missing[@]}" || { [ "$created" = 1 ] && rm -f "$guard"; exit 1; }
	[ "$created" = 1 ] && rm -f "$guard"
	return 0
}

system_packages
kernel_headers
case "${1:-}" in
--system) ;;
--test) venv; test_packages ;;
*) venv ;;
esac
