#!/usr/bin/env bash
# Install smtpguard on this host (what `make install` runs), idempotently:
#   /opt/smtpguard/venv        the agent (a venv seeing Debian's bcc and nftables)
#   /opt/smtpguard/bpf         the classifier's C source (compiled at start)
#   /opt/smtpguard/{policies,dashboards,alerts,docs,README.md}
#   /etc/systemd/system/smtpguard.service, /etc/default/smtpguard (kept if present)
#   /etc/smtpguard/policy.yaml  from policies/default.yaml, unless one exists
# DESTDIR=/some/root installs into that tree instead (packaging, tests): the
# venv there runs from that path.
#   scripts/install.sh --uninstall [--purge]   (--purge also removes config and state)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=/opt/smtpguard
UNIT_DIR=/etc/systemd/system
say() { printf 'install: %s\n' "$*" >&2; }

reload_systemd() {
	if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
		systemctl daemon-reload
	fi
}

if [ "${1:-}" = "--uninstall" ]; then
	if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
		systemctl disable --now smtpguard.service 2>/dev/null || true
	fi
	rm -rf "$DESTDIR$PREFIX" "$DESTDIR$UNIT_DIR/smtpguard.service" \
		"$DESTDIR/etc/libvirt/hooks/qemu.d/smtpguard"
	if [ "${2:-}" = "--purge" ]; then
		rm -rf "$DESTDIR/etc/smtpguard" "$DESTDIR/etc/default/smtpguard" \
			"$DESTDIR/var/lib/smtpguard"
	fi
	reload_systemd
	say "removed $PREFIX and the unit (enforcement in the kernel is left: smtpguard run --cleanup first to drop it)"
	exit 0
fi

[ -z "$DESTDIR" ] && "$ROOT/scripts/setup.sh" --system
install -d -m 0755 "$DESTDIR$PREFIX" "$DESTDIR$UNIT_DIR" "$DESTDIR/etc/default"
install -d -m 0700 "$DESTDIR/etc/smtpguard" "$DESTDIR/var/lib/smtpguard"
rm -rf "$DESTDIR$PREFIX/bpf" "$DESTDIR$PREFIX/policies" "$DESTDIR$PREFIX/dashboards" \
	"$DESTDIR$PREFIX/alerts" "$DESTDIR$PREFIX/docs"
cp -r "$ROOT/bpf" "$ROOT/policies" "$ROOT/dashboards" "$ROOT/alerts" "$ROOT/docs" \
	"$ROOT/README.md" "$DESTDIR$PREFIX/"
if [ ! -x "$DESTDIR$PREFIX/venv/bin/python" ]; then
	/usr/bin/python3 -m venv --system-site-packages "$DESTDIR$PREFIX/venv"
fi
"$DESTDIR$PREFIX/venv/bin/python" -m pip install -q --disable-pip-version-check \
	--upgrade "$ROOT" 2>&1 | grep -v '^WARNING: Location' >&2 || true
"$DESTDIR$PREFIX/venv/bin/smtpguard" version >/dev/null
install -m 0644 "$ROOT/systemd/smtpguard.service" "$DESTDIR$UNIT_DIR/smtpguard.service"
[ -e "$DESTDIR/etc/default/smtpguard" ] ||
	install -m 0644 "$ROOT/systemd/smtpguard.default" "$DESTDIR/etc/default/smtpguard"
[ -e "$DESTDIR/etc/smtpguard/policy.yaml" ] ||
	install -m 0600 "$ROOT/policies/default.yaml" "$DESTDIR/etc/smtpguard/policy.yaml"
# libvirt hosts: the qemu hook, the synchronous path that names a starting
# domain's taps before QEMU runs (libvirt >= 6.5 runs every file in qemu.d).
if [ -d "$DESTDIR/etc/libvirt" ]; then
	install -d -m 0755 "$DESTDIR/etc/libvirt/hooks/qemu.d"
	install -m 0755 "$ROOT/libvirt/qemu-hook" "$DESTDIR/etc/libvirt/hooks/qemu.d/smtpguard"
	say "libvirt hook installed: restart libvirtd once so that it reads it"
fi
reload_systemd
say "installed in ${DESTDIR:-/}: systemctl enable --now smtpguard"
