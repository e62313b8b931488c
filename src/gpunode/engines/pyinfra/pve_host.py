"""Proxmox VE host prepared for GPU passthrough: the steps of gpunode.core.pve_host.plan, in
order, then a last look (after a reboot) that stops the host if it is still not ready."""

from pyinfra.api import deploy

from gpunode.core import pve_host
from gpunode.engines.pyinfra import ops, quiet_reboot_waits
from gpunode.model import NodeProfile


@deploy("Proxmox host")
def deploy_pve_host(p: NodeProfile) -> None:
    quiet_reboot_waits()
    for step in pve_host.plan(p, ops.snapshot(p)):
        ops.plan_step(name=step.title, p=p, concern=pve_host.CONCERN, key=step.key)
    ops.plan_verify(name="Check the host is ready for passthrough", p=p,
                    concern=pve_host.CONCERN)
