"""gpunode's one typed model of a fleet: a Site of partial layers resolves into one
NodeProfile per host (see gpunode.inventory for loading and merging)."""

from gpunode.model.parts import (
    Connection,
    ContainerToolkit,
    Cuda,
    Cudnn,
    Dcgm,
    GpuExpect,
    GpuSettings,
    Hostpci,
    Hugepages,
    Nccl,
    Nvidia,
    PveHost,
    Tuning,
    Vllm,
    VllmService,
    VmSpec,
)
from gpunode.model.profile import (
    NodeProfile,
    Problem,
    ProfileProblems,
    check_fleet,
    check_profile,
)
from gpunode.model.site import SiteMeta, SiteSchema

__all__ = [
    "Connection", "ContainerToolkit", "Cuda", "Cudnn", "Dcgm", "GpuExpect", "GpuSettings",
    "Hostpci", "Hugepages", "Nccl", "NodeProfile", "Nvidia", "Problem", "ProfileProblems",
    "PveHost", "SiteMeta",
    "SiteSchema", "Tuning", "VmSpec", "Vllm", "VllmService", "check_fleet", "check_profile",
]
