"""pyinfra entry: prepare each Proxmox VE host (kind pve-host) for GPU passthrough.

    pyinfra inventory/pyinfra_inventory.py deploy/pve_host.py

Hosts of other kinds are left alone (deploy/gpu_node.py converges them)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pyinfra import host  # noqa: E402

from gpunode.deploys.pve_host import deploy_pve_host  # noqa: E402
from gpunode.model import NodeProfile  # noqa: E402

_p = NodeProfile.model_validate(host.data.node)
if _p.kind == "pve-host":
    deploy_pve_host(_p)
