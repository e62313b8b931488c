"""The resolved per-host profile and the rules that span several fields."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from pydantic import Field, StrictInt, model_validator

from gpunode.core.paths import VLLM_HOME
from gpunode.model.parts import (
    NCCL_BUILDS,
    OS_PYTHON,
    PVE_OS,
    Connection,
    ContainerToolkit,
    Cuda,
    Cudnn,
    Dcgm,
    GpuExpect,
    Nccl,
    NodeKind,
    Nvidia,
    OsName,
    PveHost,
    Strict,
    Tuning,
    Vllm,
    VmSpec,
    distro_of,
    nccl_cudas,
)
from gpunode.model.types import VOLID, DebName, DebVersion, PyName, PyVersion, WheelHash

#: The apt groups a lock pins package by package (the driver set is pinned by its version).
LockedGroup = Literal["cuda", "nccl", "cudnn", "container-toolkit", "dcgm"]

#: NodeProfile fields gpunode fills from <site>.lock; a site file never sets them.
FROM_LOCK = ("locked", "locked_vllm", "locked_image")


class PyPin(Strict):
    """One Python distribution of a locked vLLM set."""

    version: PyVersion = Field(description="Exact version.")
    hashes: list[WheelHash] = Field(min_length=1, description="sha256 of each fitting wheel.")


class ImagePin(Strict):
    """What a pve-guest's VM is made from, as the lock records it (proxmox.state)."""

    volid: str | None = Field(None, pattern=VOLID,
                              description="Cloud image volume (storage:path).")
    format: str | None = Field(None, pattern=r"^[a-z0-9]{0,16}$", description="Its format.")
    size: StrictInt | None = Field(None, ge=0, description="Its size in bytes.")
    ctime: StrictInt | None = Field(None, ge=0, description="Its creation time (epoch s).")
    template_vmid: StrictInt | None = Field(None, ge=100, description="Template VM id.")
    digest: str | None = Field(None, pattern=r"^[0-9a-f]{0,64}$",
                               description="PVE's digest of the template's config.")


#: Memory kept free for the OS and model loading when huge pages are reserved (MiB).
HUGEPAGE_HEADROOM_MIB = 8192


class NodeProfile(Strict):
    """Everything gpunode needs to build, tune and prove one host."""

    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$", description="Inventory name.")
    groups: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]] = Field(
        default_factory=list, description="Site groups, applied in order.")
    connection: Connection = Field(description="How to reach the host.")
    os: OsName = Field("ubuntu-24.04", description="Operating system.")
    kind: NodeKind = Field("bare-metal", description="bare-metal, pve-guest or pve-host.")
    reboot: Literal["auto", "never"] = Field(
        "auto", description="auto: reboot when needed during a deploy (vLLM units stopped "
        "first); never: finish what is safe and report the host as needing a reboot.")
    reboot_timeout_s: StrictInt = Field(900, ge=60, description="How long to wait for a reboot.")
    apt_lock_timeout_s: StrictInt = Field(
        300, ge=0, le=3600, description="How long apt and dpkg steps wait for the dpkg lock "
        "held by another process (unattended-upgrades, a person) before the host fails.")
    memory_mib: StrictInt | None = Field(None, ge=1024, description="Host RAM (for hugepage checks).")
    gpus: GpuExpect = Field(default_factory=GpuExpect, description="GPUs the host must have.")
    nvidia: Nvidia = Field(default_factory=Nvidia, description="NVIDIA driver.")
    cuda: Cuda = Field(default_factory=Cuda, description="Host CUDA toolkit.")
    nccl: Nccl = Field(default_factory=Nccl, description="Host NCCL.")
    cudnn: Cudnn = Field(default_factory=Cudnn, description="Host cuDNN.")
    container_toolkit: ContainerToolkit = Field(default_factory=ContainerToolkit,
                                                description="NVIDIA Container Toolkit.")
    dcgm: Dcgm = Field(default_factory=Dcgm, description="DCGM and exporter.")
    tuning: Tuning = Field(default_factory=Tuning, description="Host tuning.")
    vllm: Vllm = Field(default_factory=Vllm, description="vLLM services.")
    vm: VmSpec | None = Field(None, description="VM spec (kind pve-guest).")
    pve: PveHost | None = Field(None, description="Proxmox host preparation (kind pve-host).")
    # Not a site key (the loader refuses it there, the site schema leaves it out): gpunode
    # fills it from <site>.lock, and the engines receive it with the rest of the profile.
    locked: dict[LockedGroup, dict[DebName, DebVersion]] = Field(
        default_factory=dict, description="Exact apt versions from the site's lock, per group "
        "(the group's packages and their dependencies from the same repository).")
    locked_vllm: dict[PyName, PyPin] = Field(
        default_factory=dict, description="The vLLM venv's exact set from the site's lock "
        "(installed with --require-hashes; an empty map: vLLM at its version).")
    locked_image: ImagePin | None = Field(
        None, description="The image or template a new VM must come from (the site's lock).")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> NodeProfile:
        """Every path that builds a profile (loader, action plugin, deploy entry files,
        checks) gets the rules spanning several fields; they run once field types passed.
        Pure and cheap (no I/O): rules that read files, e.g. that api_key_file exists,
        stay in `gpunode deploy`, which runs where the files are."""
        problems = check_profile(self)
        if problems:
            raise ProfileProblems(problems, self)
        return self

    @property
    def distro(self) -> str:
        """NVIDIA's repository name for the OS: ubuntu2204, ubuntu2404, debian12."""
        return distro_of(self.os)

    @property
    def numa_balancing(self) -> bool:
        if self.tuning.numa_balancing is not None:
            return self.tuning.numa_balancing
        pinned = self.tuning.cpu_placement == "gpu-local" and bool(self.vllm.services)
        return not pinned


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where (a field path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ProfileProblems(ValueError):
    """check_profile's problems, raised by NodeProfile's validator. It keeps them whole
    (field paths included) and the profile they were found in, so the loader reports each
    on its own line and still checks the fleet; elsewhere pydantic prints one per line."""

    def __init__(self, problems: list[Problem], profile: NodeProfile):
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems
        self.profile = profile


def check_profile(p: NodeProfile) -> list[Problem]:
    """Rules spanning several fields (NodeProfile's validator runs them). Paths are
    relative to the node."""
    problems: list[Problem] = []
    add = lambda path, msg: problems.append(Problem(path, msg))  # noqa: E731

    if p.kind == "pve-guest" and p.vm is None:
        add("vm", "a pve-guest needs a vm section (pve_node, vmid, template_vmid or cloud_image)")
    if p.kind != "pve-guest" and p.vm is not None:
        add("vm", f"only pve-guest nodes take a vm section (kind is {p.kind})")
    if p.kind != "pve-host" and p.pve is not None:
        add("pve", f"only pve-host nodes take a pve section (kind is {p.kind})")
    if p.kind == "pve-host" and p.os not in PVE_OS:
        add("os", f"a pve-host runs Proxmox VE on Debian ({' or '.join(PVE_OS)}), not {p.os}")
    if p.kind != "pve-host" and p.os == "debian-13":
        add("os", "debian-13 is supported for pve-host nodes (Proxmox VE 9) only; GPU nodes "
            f"run {', '.join(o for o in get_args(OsName) if o != 'debian-13')}")
    if p.nvidia.source == "ubuntu-archive" and not p.os.startswith("ubuntu"):
        add("nvidia.source", f"ubuntu-archive drivers exist only on Ubuntu (os is {p.os}); "
            "use cuda-repo")
    if p.vllm.services and p.nvidia.branch < 580:
        add("nvidia.branch", f"vLLM {p.vllm.version} needs CUDA 13, i.e. driver branch 580 or "
            f"newer (branch is {p.nvidia.branch})")
    cudas = nccl_cudas(p.nccl.version)
    if p.nccl.enabled and cudas and p.cuda.version not in cudas:
        known = ", ".join(NCCL_BUILDS.get(p.cuda.version, ())) or "none known"
        add("nccl.version", f"NCCL {p.nccl.version} is not built for CUDA {p.cuda.version} "
            f"(libnccl2={p.nccl.version}-1+cuda{p.cuda.version} does not exist): NVIDIA "
            f"builds it for CUDA {', '.join(cudas)}; NCCL builds for CUDA {p.cuda.version}: "
            f"{known}. Change nccl.version or cuda.version")
    os_python = OS_PYTHON[p.os]
    if (p.kind != "pve-host" and p.vllm.python != os_python and p.vllm.index_url
            and not p.vllm.python_mirror):
        use = f'use python "{os_python}" or ' if int(os_python.split(".")[1]) >= 11 else ""
        add("vllm.python", f"{p.os} ships Python {os_python}, not {p.vllm.python}, and uv "
            "cannot download one: vllm.index_url turns its Python downloads off; "
            f"{use}set vllm.python_mirror to a mirror of uv's Python builds")

    if p.vm is not None:
        for i, dev in enumerate(p.vm.hostpci):
            if dev.pcie and p.vm.machine != "q35":
                add(f"vm.hostpci[{i}].pcie", "pcie=1 needs machine q35")
        if p.vm.hugepages == "1024" and p.vm.memory_mib % 1024:
            add("vm.memory_mib", f"{p.vm.memory_mib} MiB is not a multiple of 1024, which "
                "1G huge pages need")
        if p.vm.hostpci and p.vm.bios != "ovmf":
            add("vm.bios", "GPU passthrough needs OVMF (UEFI)")

    v = p.vllm
    if v.services and v.user == p.connection.user:
        add("vllm.user", f"{v.user!r} is also the SSH user gpunode logs in as; the services "
            "need an account of their own")
    for a, b in ((v.prefix, v.model_cache), (v.model_cache, v.prefix),
                 (v.prefix, VLLM_HOME)):
        if a == b or a.startswith(b + "/"):
            add("vllm.prefix", f"{v.prefix} must lie outside the service user's directories "
                f"({v.model_cache}, {VLLM_HOME}) and the model cache outside it: root runs "
                "the installer from the prefix")
            break
    for i, svc in enumerate(v.services):
        if svc.local_model and (svc.model == "/home" or svc.model.startswith(("/home/", "/root/"))):
            add(f"vllm.services[{i}].model", f"{svc.model} is hidden from the service "
                "(its unit has ProtectHome=yes); put the model below the model cache or /srv")

    hp = p.tuning.hugepages
    if hp.count:
        page_mib = 2 if hp.size == "2M" else 1024
        reserved = hp.count * page_mib
        total = p.memory_mib or (p.vm.memory_mib if p.vm else None)
        if total is None:
            add("tuning.hugepages.count", "reserving huge pages needs memory_mib (host RAM) so "
                "gpunode can check enough is left for the OS and model loading")
        elif total - reserved < HUGEPAGE_HEADROOM_MIB:
            add("tuning.hugepages.count", f"{hp.count} x {hp.size} reserves {reserved} MiB of "
                f"{total} MiB; leave at least {HUGEPAGE_HEADROOM_MIB} MiB for the OS and model "
                "loading")

    gpu_count = p.gpus.count
    ports: dict[int, str] = {}
    names: set[str] = set()
    util: dict[int, float] = defaultdict(float)
    for i, svc in enumerate(p.vllm.services):
        base = f"vllm.services[{i}]"
        if svc.name in names:
            add(f"{base}.name", f"duplicate service name {svc.name!r}")
        names.add(svc.name)
        if len(set(svc.gpus)) != len(svc.gpus):
            add(f"{base}.gpus", f"lists a GPU twice: {svc.gpus}")
        missing = [g for g in svc.gpus if g >= gpu_count]
        if missing:
            add(f"{base}.gpus", f"GPU(s) {missing} do not exist on this node "
                f"(gpus.count is {gpu_count}; valid indices 0..{max(gpu_count - 1, 0)})")
        world = svc.world_size
        if len(svc.gpus) != world and not missing and len(set(svc.gpus)) == len(svc.gpus):
            sizes = " x ".join([f"tensor_parallel_size {svc.tensor_parallel_size}",
                                *(f"{k} {v}" for k, v in svc.parallel_args.items())])
            add(f"{base}.tensor_parallel_size", f"one vLLM server uses {sizes} = {world} "
                f"GPU(s), but gpus lists {len(svc.gpus)} {svc.gpus}: list {world} GPU(s), or "
                f"set tensor_parallel_size to {len(svc.gpus)}")
        if svc.port < 1024 and not p.vllm.bind_privileged_ports:
            add(f"{base}.port", f"port {svc.port} is privileged (below 1024) and the unit "
                "has no capability to bind it: use 1024-65535, or set "
                "vllm.bind_privileged_ports: true")
        if svc.port in ports:
            add(f"{base}.port", f"port {svc.port} is already used by service "
                f"{ports[svc.port]!r}; ports must be unique per node")
        ports.setdefault(svc.port, svc.name)
        if not svc.local_model and not svc.revision:
            add(f"{base}.revision", "a Hugging Face model needs a pinned revision (commit hash) "
                "so a node can be rebuilt exactly")
        for g in set(svc.gpus):
            util[g] += svc.gpu_memory_utilization
    for g, total_util in sorted(util.items()):
        if total_util > 1.0 + 1e-9:
            users = [s.name for s in p.vllm.services if g in s.gpus]
            add("vllm.services", f"GPU {g} is shared by {users} with gpu_memory_utilization "
                f"summing to {total_util:.2f}; the sum per GPU must be <= 1.0")
    return problems


def check_fleet(nodes: dict[str, NodeProfile]) -> list[tuple[str, Problem]]:
    """Rules across nodes: Proxmox references resolve (a guest's pve_node is a pve-host
    node of the site, its hostpci mappings exist on that host) and ids are unique (vmids
    per site, mapping names and their devices per host). (node name, problem) pairs."""
    problems: list[tuple[str, Problem]] = []
    hosts = {n: p for n, p in nodes.items() if p.kind == "pve-host"}
    for name, p in hosts.items():
        seen_names: dict[str, int] = {}
        seen_addresses: dict[str, str] = {}
        for i, mapping in enumerate(p.pve.pci_mappings if p.pve else []):
            base = f"pve.pci_mappings[{i}]"
            if mapping.name in seen_names:
                problems.append((name, Problem(f"{base}.name", f"duplicate mapping name "
                                               f"{mapping.name!r} (also entry "
                                               f"{seen_names[mapping.name]})")))
            seen_names.setdefault(mapping.name, i)
            for address in mapping.addresses:
                other = seen_addresses.setdefault(address, mapping.name)
                if other != mapping.name:
                    problems.append((name, Problem(f"{base}.addresses", f"{address} is also "
                                                   f"in mapping {other!r}; a device belongs "
                                                   "to one mapping")))
    vmids: dict[int, str] = {}
    for name, p in nodes.items():
        if p.vm is None:
            continue
        host = hosts.get(p.vm.pve_node)
        if host is None:
            known = ", ".join(sorted(hosts)) or "none in this site"
            problems.append((name, Problem("vm.pve_node", f"{p.vm.pve_node!r} is not a "
                                           f"pve-host node of this site (pve-host nodes: "
                                           f"{known})")))
        else:
            mappings = {m.name for m in (host.pve.pci_mappings if host.pve else [])}
            for i, dev in enumerate(p.vm.hostpci):
                if dev.mapping is not None and dev.mapping not in mappings:
                    problems.append((name, Problem(
                        f"vm.hostpci[{i}].mapping", f"{dev.mapping!r} is not a PCI mapping "
                        f"of {p.vm.pve_node} (its pve.pci_mappings: "
                        f"{', '.join(sorted(mappings)) or 'none'})")))
        if p.vm.vmid in vmids:
            problems.append((name, Problem("vm.vmid", f"vmid {p.vm.vmid} is also used by "
                                           f"{vmids[p.vm.vmid]}; VM ids are unique in a "
                                           "cluster")))
        vmids.setdefault(p.vm.vmid, name)
    for name, p in nodes.items():
        if p.vm is not None and p.vm.template_vmid in vmids:
            problems.append((name, Problem("vm.template_vmid", f"{p.vm.template_vmid} is the "
                                           f"vmid of node {vmids[p.vm.template_vmid]}, not a "
                                           "template")))
    return problems
