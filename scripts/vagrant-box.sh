#!/usr/bin/env bash
# Build a vagrant-libvirt box of Debian 12 from Debian packages, idempotently:
# nothing is downloaded but Debian packages and (through the host's pip
# configuration) the project's Python dependencies. Quiet when cached; root.
#
#   scripts/vagrant-box.sh          build if missing; print the .box path
#   scripts/vagrant-box.sh --add    also `vagrant box add` it as $SMTPGUARD_BOX
#                                   (default smtpguard/bookworm-local) unless
#                                   the added copy is already this build
#
# The box: mmdebstrap of bookworm with systemd as PID 1, Debian's cloud kernel
# and its matching headers (bcc compiles the normal way), openssh-server,
# sudo, the user vagrant (passwordless sudo, Vagrant's insecure key from the
# Debian vagrant package), every package scripts/setup.sh installs, and a
# wheelhouse of the project's Python dependencies with an /etc/pip.conf that
# uses only it. So `make setup` in the guest needs no network. The disk has
# an MBR and one ext4 partition booted by extlinux (syslinux), a real
# bootloader: the box works with any vagrant-libvirt, no kernel outside it.
#
# Cached under $CACHE/<key>/ where key hashes the inputs (this script,
# pyproject.toml, setup.sh's package list, the insecure key, the candidate
# kernel), so a second run reuses the box and a changed input rebuilds it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${SMTPGUARD_TEST_CACHE:-/var/cache/smtpguard-test}/vagrant
BOX_NAME=${SMTPGUARD_BOX:-smtpguard/bookworm-local}
SIZE_GB=16 # virtual disk; sparse, the qcow2 holds only what is written
WHEELS=/var/cache/smtpguard-wheels # in the guest
HOST_PACKAGES=(vagrant vagrant-libvirt qemu-utils mmdebstrap dnsmasq-base extlinux
	syslinux-common fdisk e2fsprogs)
GUEST_BASE=(systemd-sysv dbus udev initramfs-tools linux-image-cloud-amd64
	linux-headers-cloud-amd64 openssh-server sudo rsync make kmod procps
	iputils-ping ca-certificates)

say() { printf 'vagrant-box: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap, loop devices)"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

apt_updated=0
apt_update() {
	if [ "$apt_updated" -eq 0 ]; then
		apt-get update -qq >/dev/null
		apt_updated=1
	fi
}

# As hypervisor-setup.sh: policy-rc.d exits 101, so no service starts (and a
# guard someone else put there stays theirs).
host_packages() {
	local missing=() p guard=/usr/sbin/policy-rc.d log=/tmp/smtpguard-vagrant-apt.log
	for p in "${HOST_PACKAGES[@]}"; do
		installed "$p" || missing+=("$p")
	done
	[ "${#missing[@]}" -gt 0 ] || return 0
	apt_update
	if [ ! -e "$guard" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$guard"
		chmod +x "$guard"
		trap 'rm -f /usr/sbin/policy-rc.d' EXIT
	fi
	say "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		"${missing[@]}" >"$log" 2>&1 ||
		{ cat "$log" >&2; die "apt-get install ${missing[*]} failed"; }
	if [ -e "$guard" ] && trap -p EXIT | grep -q policy-rc.d; then
		rm -f "$guard"
		trap - EXIT
	fi
}

# The packages scripts/setup.sh installs, read from it (one list, one owner).
setup_packages() {
	sed -n '/^APT_PACKAGES=(/,/)/p' "$ROOT/scripts/setup.sh" | tr -d '()' |
		sed 's/APT_PACKAGES=//' | tr -s ' \t\n' '\n' | grep -v '^$'
}

# Everything `pip install -e .[dev]` resolves: dependencies and dev extras from
# pyproject.toml, and what building the project itself needs.
python_requirements() {
	/usr/bin/python3 - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    p = tomllib.load(f)
reqs = p["build-system"]["requires"] + p["project"]["dependencies"]
reqs += p["project"].get("optional-dependencies", {}).get("dev", [])
print("\n".join([*reqs, "wheel"]))
EOF
}

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2}'; }

insecure_key() {
	local key
	key=$(dpkg -L vagrant | grep '/keys/vagrant\.pub$' | head -n1)
	[ -n "$key" ] && [ -s "$key" ] || die "the vagrant package ships no keys/vagrant.pub"
	echo "$key"
}

# What the box is made of; its hash is the cache key (kept beside the box).
box_inputs() {
	local kernel
	kernel=$(candidate linux-image-cloud-amd64)
	[ -n "$kernel" ] || { apt_update; kernel=$(candidate linux-image-cloud-amd64); }
	sha256sum "$0" "$PUBKEY" | cut -d' ' -f1
	python_requirements
	setup_packages
	echo "kernel $kernel"
}

# -- the root file system ---------------------------------------------------

wheelhouse() { # DIR
	say "building the wheelhouse (host pip configuration)"
	python_requirements >"$1.txt"
	/usr/bin/python3 -m pip wheel -q --disable-pip-version-check -w "$1" -r "$1.txt" \
		>"$1.log" 2>&1 || { cat "$1.log" >&2; die "pip wheel failed"; }
	rm -f "$1.txt" "$1.log"
}

customize() { # ROOTFS UUID WHEELDIR
	local r=$1 uuid=$2 kver
	chroot "$r" useradd -m -s /bin/bash -G sudo vagrant
	echo vagrant:vagrant | chroot "$r" chpasswd
	echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$r/etc/sudoers.d/vagrant"
	chmod 0440 "$r/etc/sudoers.d/vagrant"
	install -d -m 0700 -o 1000 -g 1000 "$r/home/vagrant/.ssh"
	install -m 0600 -o 1000 -g 1000 "$PUBKEY" "$r/home/vagrant/.ssh/authorized_keys"
	echo smtpguard-box >"$r/etc/hostname"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\tsmtpguard-box\n::1\tlocalhost ip6-localhost\n' \
		>"$r/etc/hosts"
	printf 'UUID=%s\t/\text4\tdefaults,errors=remount-ro\t0\t1\n' "$uuid" >"$r/etc/fstab"
	# DHCP on every wired NIC (vagrant-libvirt's management network is first).
	printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' \
		>"$r/etc/systemd/network/20-wired.network"
	chroot "$r" systemctl enable -q systemd-networkd
	chroot "$r" systemctl mask -q apt-daily.timer apt-daily-upgrade.timer
	# Host keys are made on each box's first boot, not shared by all of them.
	rm -f "$r"/etc/ssh/ssh_host_*
	mkdir -p "$r/etc/systemd/system/ssh.service.d"
	printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
		>"$r/etc/systemd/system/ssh.service.d/host-keys.conf"
	echo 'UseDNS no' >"$r/etc/ssh/sshd_config.d/vagrant.conf"
	# pip in the guest: the baked wheelhouse only.
	mkdir -p "$r$WHEELS"
	cp "$3"/*.whl "$r$WHEELS/"
	printf '[global]\nno-index = true\nfind-links = %s\ndisable-pip-version-check = true\n' \
		"$WHEELS" >"$r/etc/pip.conf"
	: >"$r/etc/machine-id"
	kver=$(cd "$r/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -n1)
	[ -n "$kver" ] && [ -e "$r/boot/initrd.img-$kver" ] || die "no kernel/initrd in the image"
	[ -e "$r/usr/src/linux-headers-$kver/Makefile" ] || die "no headers for $kver in the image"
	mkdir -p "$r/boot/extlinux"
	cat >"$r/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
	LINUX /boot/vmlinuz-$kver
	INITRD /boot/initrd.img-$kver
	APPEND root=UUID=$uuid ro console=tty0 console=ttyS0,115200n8
EOF
}

rootfs() { # DIR UUID WHEELDIR
	local packages
	packages=$(printf '%s,' "${GUEST_BASE[@]}" $(setup_packages))
	say "mmdebstrap bookworm (${packages%,})"
	mmdebstrap --quiet --variant=minbase --include="${packages%,}" \
		--aptopt='Acquire::Check-Valid-Until "false"' \
		--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
		bookworm "$1" /etc/apt/sources.list.d/debian.sources >"$1.log" 2>&1 ||
		{ tail -n 40 "$1.log" >&2; die "mmdebstrap failed (log: $1.log)"; }
	rm -f "$1.log"
	customize "$@"
}

# -- the disk ----------------------------------------------------------------

# MBR (syslinux's mbr.bin) + one bootable ext4 partition from 1 MiB, made by
# mke2fs -d into the image file at that offset (no mount for the copy); only
# extlinux needs the file system mounted once, through a loop device.
disk() { # ROOTFS UUID RAW
	local raw=$3 mnt loop off=$((1024 * 1024))
	truncate -s "${SIZE_GB}G" "$raw"
	echo "2048,,L,*" | sfdisk -q "$raw" >/dev/null
	# ^64bit: syslinux 6.04 cannot read ext4 with the 64bit feature.
	mke2fs -q -t ext4 -O ^64bit -U "$2" -L root -E offset=$off -d "$1" "$raw" \
		"$((SIZE_GB * 1024 - 1))M"
	dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
	mnt=$(mktemp -d /tmp/smtpguard-vbox-mnt.XXXXXX)
	loop=$(losetup -f --show -o "$off" "$raw")
	if mount "$loop" "$mnt"; then
		extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1 || { umount "$mnt"; losetup -d "$loop"; die "extlinux failed"; }
		umount "$mnt"
	else
		losetup -d "$loop"
		die "cannot mount $loop"
	fi
	losetup -d "$loop"
	rmdir "$mnt"
}

package() { # RAW OUTDIR
	local work=$2/box
	mkdir -p "$work"
	qemu-img convert -q -f raw -O qcow2 "$1" "$work/box.img"
	printf '{"provider":"libvirt","format":"qcow2","virtual_size":%d}\n' "$SIZE_GB" \
		>"$work/metadata.json"
	cat >"$work/Vagrantfile" <<'EOF'
# smtpguard's local Debian 12 box (scripts/vagrant-box.sh): boots from its own
# disk (extlinux), user vagrant with Vagrant's insecure key, pip offline.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
  end
end
EOF
	echo "$KEY" >"$work/smtpguard-box-key"
	tar -C "$work" -cf "$2/smtpguard-bookworm.box" metadata.json Vagrantfile box.img smtpguard-box-key
	rm -rf "$work"
}

build() {
	local dir=$CACHE/$KEY tmp uuid
	[ -e "$dir/.complete" ] && return 0
	mkdir -p "$CACHE"
	tmp=$(mktemp -d "$CACHE/.build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	uuid=$(cat /proc/sys/kernel/random/uuid)
	wheelhouse "$tmp/wheels"
	rootfs "$tmp/root" "$uuid" "$tmp/wheels"
	say "making the disk"
	disk "$tmp/root" "$uuid" "$tmp/disk.raw"
	rm -rf "$tmp/root"
	mkdir "$tmp/out"
	package "$tmp/disk.raw" "$tmp/out"
	# Older builds go: one box is cached.
	find "$CACHE" -mindepth 1 -maxdepth 1 -not -name '.*' -exec rm -rf {} +
	printf '%s\n' "$INPUTS" >"$tmp/out/inputs"
	mv "$tmp/out" "$dir"
	touch "$dir/.complete"
	rm -rf "$tmp"
	trap - EXIT
	say "built $dir/smtpguard-bookworm.box"
}

# `vagrant box add` unless the added box is this build (its key file says).
add() {
	local home=${VAGRANT_HOME:-$HOME/.vagrant.d} escaped
	escaped=${BOX_NAME//\//-VAGRANTSLASH-}
	if [ "$(cat "$home/boxes/$escaped/0/libvirt/smtpguard-box-key" 2>/dev/null)" = "$KEY" ]; then
		return 0
	fi
	say "vagrant box add $BOX_NAME"
	vagrant box add --force --name "$BOX_NAME" --provider libvirt \
		"$CACHE/$KEY/smtpguard-bookworm.box" >/dev/null
}

host_packages
PUBKEY=$(insecure_key)
INPUTS=$(box_inputs)
KEY=$(printf '%s\n' "$INPUTS" | sha256sum | cut -c1-16)
build
[ "${1:-}" = "--add" ] && add
echo "$CACHE/$KEY/smtpguard-bookworm.box"
