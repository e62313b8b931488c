"""Host CUDA toolkit, NCCL and cuDNN (optional; vLLM brings its own), pinned as matched
sets and held."""

from pyinfra.api import deploy

from gpunode.core import desired, plan
from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile


@deploy("CUDA, NCCL, cuDNN")
def deploy_cuda(p: NodeProfile) -> None:
    pkgs = desired.cuda_packages(p) + desired.nccl_packages(p) + desired.cudnn_packages(p)
    if not pkgs:
        return
    ops.apt_install(name="Install the CUDA toolkit, NCCL and cuDNN (pinned)", p=p, packages=pkgs,
                    check=plan.nccl_check)
    held = [pkg.name for pkg in pkgs if pkg.version]
    if held and p.nvidia.hold:
        ops.apt_hold(name="Hold NCCL and cuDNN", p=p, names=held)
