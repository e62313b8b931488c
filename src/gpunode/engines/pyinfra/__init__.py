"""pyinfra deploys, one per concern, each taking the NodeProfile explicitly. The order
is the order of `deploy_node`: base, tuning, nvidia_driver, reboot, gpu_settings, cuda,
container_toolkit, dcgm, vllm, manifest."""

from __future__ import annotations

import logging

from gpunode.model import NodeProfile

# How a host-stopping message is logged (ops.fail, reboot policy 'never'); `gpunode deploy`
# reads these lines back as the host's errors.
STOP_PREFIX = "gpunode stop: "


def quiet_reboot_waits() -> None:
    """While a host reboots, each refused SSH attempt makes paramiko log a traceback; the
    reboot operation reports the outcome itself."""
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def deploy_node(p: NodeProfile) -> None:
    quiet_reboot_waits()
    from gpunode.engines.pyinfra import (
        base,
        container_toolkit,
        cuda,
        dcgm,
        gpu_settings,
        manifest,
        nvidia_driver,
        reboot,
        tuning,
        vllm,
    )

    if not base.deploy_base(p):
        return
    tuning.deploy_tuning(p)
    nvidia_driver.deploy_nvidia_driver(p)
    reboot.deploy_reboot(p)
    gpu_settings.deploy_gpu_settings(p)
    cuda.deploy_cuda(p)
    container_toolkit.deploy_container_toolkit(p)
    dcgm.deploy_dcgm(p)
    tuning.deploy_irq_placement(p)
    vllm.deploy_vllm(p)
    manifest.deploy_manifest(p)
