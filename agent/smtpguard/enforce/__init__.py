"""Enforcement in the kernel: nftables tables rendered from the policy."""
