"""A hypervisor in network namespaces: VMs behind a bridge, an SMTP sink."""
