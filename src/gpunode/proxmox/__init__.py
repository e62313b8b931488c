"""Proxmox VE GPU VMs through proxmoxer: client (credentials, TLS, errors), state (reads),
spec (the desired VM from a profile), plan (the pure diff), apply (tasks), run (what the
CLI, the Ansible action and the benchmark call), ready (SSH after a first boot)."""
