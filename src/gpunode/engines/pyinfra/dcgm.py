"""DCGM 4 (optional) and its host engine."""

from pyinfra.api import deploy

from gpunode.core import desired
from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile


@deploy("DCGM")
def deploy_dcgm(p: NodeProfile) -> None:
    pkgs = desired.dcgm_packages(p)
    if not pkgs:
        return
    ops.apt_install(name="Install DCGM (pinned)", p=p, packages=pkgs)
    if p.nvidia.hold:
        ops.apt_hold(name="Hold DCGM", p=p, names=[pkg.name for pkg in pkgs if pkg.version])
    ops.unit(name="Run the DCGM host engine", p=p, unit_name="nvidia-dcgm.service",
             running=lambda snap: snap.smi_ok)
