"""The kernel side: the BPF classifier, its maps and its tc attachments."""
