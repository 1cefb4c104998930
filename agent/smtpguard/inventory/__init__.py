"""Where a VM's identity comes from: libvirt, Proxmox, ifalias, name patterns."""
