"""Reboot when the host needs it (nouveau loaded, driver/library mismatch, pending kernel
arguments or ECC, /run/reboot-required) and the node's policy allows."""

from pyinfra.api import deploy

from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile


@deploy("Reboot if needed")
def deploy_reboot(p: NodeProfile) -> None:
    ops.reboot_if_needed(name="Reboot if the host needs it (policy permitting)", p=p)
