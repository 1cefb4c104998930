"""Where an agent keeps things unless told otherwise: light to import, for the
CLI's short-lived commands (libvirt's hook runs one at every domain start)."""

from pathlib import Path

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/smtpguard/default")
DEFAULT_STATE_DIR = Path("/var/lib/smtpguard")
DEFAULT_METRICS = "127.0.0.1:9725"
DEFAULT_SOCKET = Path("/run/smtpguard/control.sock")
