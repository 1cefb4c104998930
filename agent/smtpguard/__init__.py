"""smtpguard: outbound-SMTP abuse guard for hypervisors."""

__version__ = "0.2.0"
