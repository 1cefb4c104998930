"""The errors smtpguard raises; each names what it was doing when it failed."""


class SmtpguardError(Exception):
    """Base of every error smtpguard raises on purpose."""


class PolicyError(SmtpguardError):
    """A policy file is unreadable or invalid."""


class BpfLoadError(SmtpguardError):
    """The BPF program did not compile, load or find its maps."""


class AttachError(SmtpguardError):
    """A tc filter could not be attached to or removed from an interface."""


class EnforcerError(SmtpguardError):
    """The firewall backend rejected a change."""


class BackendUnavailable(EnforcerError):
    """A firewall backend cannot run on this host (library or kernel missing)."""


class LabError(SmtpguardError):
    """The network-namespace lab could not be built or driven."""


class StoreError(SmtpguardError):
    """The state database could not be read or written."""
