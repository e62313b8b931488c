"""pyinfra entry: turn each host into the GPU node its profile describes.

    pyinfra inventory/pyinfra_inventory.py deploy/gpu_node.py

The inventory gives every host its resolved profile as `host.data.node`."""

from pyinfra import host

from gpunode.engines.pyinfra import deploy_node
from gpunode.model import NodeProfile

_p = NodeProfile.model_validate(host.data.node)
if _p.kind != "pve-host":  # Proxmox hosts: deploy/pve_host.py
    deploy_node(_p)
