"""pvesim: a simulated Proxmox VE API for the lab (SIMULATION, test equipment).

Serves the part of the PVE 9 (default) or 8.4 API the toolkit uses over HTTPS on
127.0.0.1, with PVE's validation, wording, permissions, tasks and locks; `start` boots lab
VMs. Nothing in the product imports this package. See `gpunode/lab/README.md` (pvesim).
"""
