"""pyinfra entry: turn each host into the GPU node its profile describes.

    pyinfra inventory/pyinfra_inventory.py deploy/gpu_node.py

The inventory gives every host its resolved profile as `host.data.node`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pyinfra import host  # noqa: E402

from gpunode.deploys import deploy_node  # noqa: E402
from gpunode.model import NodeProfile  # noqa: E402

_p = NodeProfile.model_validate(host.data.node)
if _p.kind != "pve-host":  # Proxmox hosts: deploy/pve_host.py
    deploy_node(_p)
