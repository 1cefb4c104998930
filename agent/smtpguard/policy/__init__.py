"""Policy: the operator's YAML, parsed into frozen models."""

from smtpguard.policy.load import LoadedPolicy, PolicyErrors, load_path, load_policy, load_text
from smtpguard.policy.model import InterfacePattern, Policy

__all__ = ["InterfacePattern", "LoadedPolicy", "Policy", "PolicyErrors", "load_path",
           "load_policy", "load_text"]
