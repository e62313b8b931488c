"""pyinfra entry: prepare each Proxmox VE host (kind pve-host) for GPU passthrough.

    pyinfra inventory/pyinfra_inventory.py deploy/pve_host.py

Hosts of other kinds are left alone (deploy/gpu_node.py converges them)."""

from pyinfra import host

from gpunode.engines.pyinfra.pve_host import deploy_pve_host
from gpunode.model import NodeProfile

_p = NodeProfile.model_validate(host.data.node)
if _p.kind == "pve-host":
    deploy_pve_host(_p)
