"""Policy: the operator's YAML, parsed into frozen models."""

from smtpguard.policy.load import load_policy, load_text
from smtpguard.policy.model import InterfacePattern, Policy

__all__ = ["InterfacePattern", "Policy", "load_policy", "load_text"]
