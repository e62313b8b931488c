"""What a node should be, computed once from its profile: package names and versions,
repositories, sysctls, kernel arguments, units. The pyinfra deploys, the Ansible roles (via
the filter plugin) and the checks all call these functions; none re-derives them."""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass

from gpunode.core import paths
from gpunode.model import NodeProfile
from gpunode.model.parts import DCGM_EXPORTER, OS_PYTHON

KEYRING_DEB = "cuda-keyring_1.1-1_all.deb"
#: Published checksums of cuda-keyring_1.1-1_all.deb for every distro a GPU node may run
#: (debian-13 is for Proxmox hosts only, which install no NVIDIA packages). Sources: the
#: checksums pinned for these exact URLs in public install scripts (research/nvidia-repo.md
#: §1.1 for debian12 and ubuntu2404; ubuntu2204 agreed on by three independent scripts
#: found through the code index, ids 56395263608, 60806462609, 68522267718).
UPSTREAM_KEYRING_SHA256 = {
    "debian12": "e7f219eab6fe4819cdb5c15b98233dc3420302d9c00883219cd3d896857cf48d",
    "ubuntu2204": "d93190d50b98ad4699ff40f4f7af50f16a76dac3bb8da1eaaf366d47898ff8df",
    "ubuntu2404": "d2a6b11c096396d868758b86dab1823b25e14d70333f1dfa74da5ddaf6a06dba",
}
UVM_DEVICES = ("/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
#: Name patterns of driver packages (holds, unattended-upgrades blacklist, checks).
DRIVER_PATTERNS = ("nvidia-*", "libnvidia-*", "libcuda1", "libcudadebugger1",
                   "cuda-drivers*", "firmware-nvidia-*", "linux-modules-nvidia-*",
                   "xserver-xorg-video-nvidia*")
UNATTENDED_BLACKLIST = ("nvidia-", "libnvidia-", "libcuda", "cuda-", "libnccl", "libcudnn",
                        "datacenter-gpu-manager", "firmware-nvidia-", "linux-modules-nvidia-")


@dataclass(frozen=True)
class Pkg:
    name: str
    version: str | None = None  # exact Debian version to install, None = candidate

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}" if self.version else self.name


def keyring_url(p: NodeProfile) -> str:
    return f"{p.nvidia.repo_url.rstrip('/')}/{p.distro}/x86_64/{KEYRING_DEB}"


def keyring_sha256(p: NodeProfile) -> str | None:
    return p.nvidia.keyring_sha256 or UPSTREAM_KEYRING_SHA256.get(p.distro)


def no_keyring_checksum(p: NodeProfile) -> str:
    return f"{p.name}: no published checksum for {keyring_url(p)}; set nvidia.keyring_sha256"


def mok_cert(p: NodeProfile) -> str:
    return paths.DKMS_MOK_CERT[p.os.split("-")[0]]


def secure_boot_stop(p: NodeProfile) -> str:
    """Why a Secure Boot host with DKMS modules stops (nvidia.secure_boot: stop)."""
    return (f"{p.name}: Secure Boot is on and the CUDA repository builds unsigned DKMS modules "
            "that will not load. Either disable Secure Boot, use nvidia.source: ubuntu-archive "
            "(Canonical-signed modules, Ubuntu), or set nvidia.secure_boot: mok and enrol the "
            f"DKMS key with `mokutil --import {mok_cert(p)}` at the next boot")


def secure_boot_notice(p: NodeProfile) -> str:
    """What a Secure Boot host with DKMS modules must do (nvidia.secure_boot: mok)."""
    return (f"Secure Boot is on: enrol {mok_cert(p)} with `mokutil --import` and reboot, or "
            "the DKMS modules will not load")


def cuda_repo_line(p: NodeProfile) -> str:
    return (f"deb [signed-by={paths.CUDA_KEYRING}] {p.nvidia.repo_url.rstrip('/')}/{p.distro}/"
            "x86_64/ /")


def cuda_repo_list_path(p: NodeProfile) -> str:
    return paths.cuda_repo_list(p.distro)




def debian_contrib(p: NodeProfile) -> bool:
    """debian-12 with NVIDIA's CUDA repository needs Debian's contrib component: its DKMS
    kernel-module packages depend on contrib packages (VERIFIED: Google's Dataproc install
    script adds "main contrib" for what nvidia-kernel-open-dkms depends on; INFERRED which:
    nvidia-kernel-common, section contrib/kernel in bookworm's Packages index)."""
    return p.os == "debian-12" and p.nvidia.source == "cuda-repo"




def debian_contrib_source(p: NodeProfile) -> str:
    """deb822 stanza: contrib of the release and its -updates at nvidia.debian_mirror,
    signed by Debian's archive keyring. apt keeps one Signed-By per URI and suite: the first
    entry read that names one sets it and every later entry must name the same or none
    ("Conflicting values set for option Signed-By ...", apt's debmetaindex.cc). The host's
    own entry is read first (sources.list, or debian.sources before gpunode-*) and names
    this keyring (deb822 debian.sources) or none (one-line sources.list), so both agree;
    with no Signed-By here, a debian.sources naming the keyring would conflict."""
    return (f"Types: deb\nURIs: {p.nvidia.debian_mirror.rstrip('/')}\n"
            "Suites: bookworm bookworm-updates\nComponents: contrib\n"
            f"Signed-By: {paths.DEBIAN_ARCHIVE_KEYRING}\n")


def dkms_kernel_package(p: NodeProfile) -> str | None:
    """The DKMS kernel-module package the driver set installs on debian-12 from the CUDA
    repository (directly, or through nvidia-open/cuda-drivers), None elsewhere."""
    if not debian_contrib(p):
        return None
    return "nvidia-kernel-open-dkms" if p.nvidia.open_kernel_modules else "nvidia-kernel-dkms"


def dkms_unmet(p: NodeProfile, package: str, version: str, need: str,
               available: list[str]) -> str:
    """Why a debian-12 host stops before its driver changes: the DKMS package needs a
    newer dkms than apt can install."""
    have = ", ".join(available) or "none"
    return (f"{p.name}: {package} {version} depends on {need}, which no dkms this host's "
            f"apt repositories offer satisfies (available: {have}; bookworm ships 3.0.10). "
            "Make a dkms that satisfies it installable (NVIDIA's repository is said to ship "
            "one; bookworm-backports had none when checked), or pin nvidia.version to an "
            "older driver (builds before 570.148.08 are said to accept bookworm's dkms)")




CDI_REFRESH_PATH = "nvidia-cdi-refresh.path"
CDI_REFRESH_SERVICE = "nvidia-cdi-refresh.service"


def cdi_refresh(p: NodeProfile) -> bool:
    """Whether the toolkit keeps the CDI spec itself (1.18 and later ship the refresh units)."""
    major, minor = (int(x) for x in p.container_toolkit.version.split(".")[:2])
    return p.container_toolkit.enabled and p.container_toolkit.cdi and (major, minor) >= (1, 18)


def cdi_spec(p: NodeProfile) -> str:
    """The CDI spec file that describes the node's GPUs."""
    return paths.CDI_SPEC if cdi_refresh(p) else paths.ETC_CDI_SPEC


def cdi_refresh_units(p: NodeProfile) -> list[str]:
    """The toolkit's units gpunode enables (none before 1.18)."""
    return [CDI_REFRESH_PATH, CDI_REFRESH_SERVICE] if cdi_refresh(p) else []


def runtime_probe(path: str) -> str:
    """Shell test: does a container runtime config know the nvidia runtime?"""
    return f"grep -qs nvidia {path}"


def ctk_repo_line(p: NodeProfile) -> str:
    return f"deb [signed-by={paths.CTK_KEYRING}] {p.container_toolkit.repo_url.rstrip('/')}/$(ARCH) /"


def driver_deb_version(p: NodeProfile) -> str | None:
    """The Debian version string of the pinned driver in the chosen source."""
    v = p.nvidia.version
    if not v:
        return None
    if p.nvidia.source == "ubuntu-archive":
        return None  # archive revisions vary per release: pinned by apt preferences
    if p.os == "debian-12":
        return f"{v}-1"
    # Ubuntu CUDA repo: 0ubuntu1 up to 580.105.08, 1ubuntu1 from 580.126 (nvidia-repo.md §2.1)
    minor = int(v.split(".")[1])
    return f"{v}-{'1' if (p.nvidia.branch > 580 or minor >= 126) else '0'}ubuntu1"


def driver_packages(p: NodeProfile) -> list[str]:
    """Driver packages to install, by source, OS, module flavour and compute-only split,
    and always nvidia-modprobe: the GPU settings unit runs it to create /dev/nvidia-uvm
    (CUDA cannot do it from a NoNewPrivileges= service), and not every set depends on it."""
    return [*_driver_set(p), "nvidia-modprobe"]


def _driver_set(p: NodeProfile) -> list[str]:
    n, b, open_ = p.nvidia, p.nvidia.branch, p.nvidia.open_kernel_modules
    if n.source == "ubuntu-archive":
        # Canonical's signed prebuilt modules: the -no-dkms userspace, so DKMS (and its
        # unsigned builds) never comes in through nvidia-headless-*.
        flavour = "-open" if open_ else ""
        return [f"nvidia-headless-no-dkms-{b}-server{flavour}", f"nvidia-utils-{b}-server",
                f"linux-modules-nvidia-{b}-server{flavour}-generic"]
    if p.os == "debian-12":
        if n.compute_only:
            kmod = "nvidia-kernel-open-dkms" if open_ else "nvidia-kernel-dkms"
            return ["nvidia-driver-cuda", kmod, "nvidia-persistenced"]
        return ["nvidia-open" if open_ else "cuda-drivers"]
    suffix = f"-{b}" if b <= 580 else ""
    if n.compute_only:
        kmod = f"nvidia-dkms{suffix}-open" if open_ else f"nvidia-dkms{suffix}"
        return [f"libnvidia-compute{suffix}", kmod, f"nvidia-utils{suffix}",
                "nvidia-persistenced"]
    return [f"nvidia-open{suffix}" if open_ else f"cuda-drivers{suffix}"]


def driver_own_version_packages(p: NodeProfile) -> frozenset[str]:
    """Driver-named packages that carry their own version, not the driver's: Ubuntu's
    archive builds nvidia-modprobe from its own source package (535.54.03-1 on noble)."""
    return frozenset({"nvidia-modprobe"}) if p.nvidia.source == "ubuntu-archive" else frozenset()


def pinning_package(p: NodeProfile) -> str | None:
    """NVIDIA's branch pinning package (CUDA repo only), installed before the driver."""
    return f"nvidia-driver-pinning-{p.nvidia.branch}" if p.nvidia.source == "cuda-repo" else None


def driver_preferences(p: NodeProfile) -> str | None:
    """apt preferences pinning the exact driver version (None without a version)."""
    if not p.nvidia.version:
        return None
    names = " ".join(DRIVER_PATTERNS)
    return (f"Package: {names}\nPin: version {p.nvidia.version}-*\nPin-Priority: 1001\n")


def is_driver_package(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in DRIVER_PATTERNS) and not name.startswith(
        ("nvidia-driver-pinning", "nvidia-container", "libnvidia-container"))


def driver_hold_set(p: NodeProfile, installed: dict[str, str]) -> list[str]:
    """Installed driver packages to hold: driver-named packages of the node's branch."""
    prefix = f"{p.nvidia.branch}."
    return sorted(name for name, version in installed.items()
                  if is_driver_package(name) and version.split(":")[-1].startswith(prefix))


def _locked(p: NodeProfile, group: str, pkgs: list[Pkg]) -> list[Pkg]:
    """A group's packages as the site's lock pins them (every package of its dependency
    closure in NVIDIA's repository, exact), or as the site names them without a lock."""
    locked = p.locked.get(group)  # type: ignore[call-overload]
    if not pkgs or not locked:
        return pkgs
    own = {x.name for x in pkgs}
    # a driver package in a closure (a library some CUDA or DCGM package depends on) stays
    # with the driver's own pin (nvidia.version): installing it at the version the lock saw
    # could fight that pin
    return [Pkg(n, v) for n, v in sorted(locked.items())
            if n in own or not any(fnmatch.fnmatch(n, pat) for pat in DRIVER_PATTERNS)]


def cuda_packages(p: NodeProfile) -> list[Pkg]:
    if not p.cuda.enabled:
        return []
    return _locked(p, "cuda", [Pkg(f"cuda-toolkit-{p.cuda.version.replace('.', '-')}")])


def nccl_packages(p: NodeProfile) -> list[Pkg]:
    if not p.nccl.enabled:
        return []
    version = f"{p.nccl.version}-1+cuda{p.cuda.version}"
    return _locked(p, "nccl", [Pkg("libnccl2", version), Pkg("libnccl-dev", version)])


def cudnn_packages(p: NodeProfile) -> list[Pkg]:
    """cuDNN's runtime, headers and -dev at one version: -dev depends on the headers package
    at exactly its own version, so the headers are pinned too (apt would otherwise pick the
    newest headers and refuse the -dev the site pins)."""
    if not p.cudnn.enabled:
        return []
    major = p.cuda.version.split(".")[0]
    version = f"{p.cudnn.version}-1"
    return _locked(p, "cudnn", [Pkg(f"libcudnn9-{part}cuda-{major}", version)
                                for part in ("", "headers-", "dev-")])


def container_toolkit_packages(p: NodeProfile) -> list[Pkg]:
    if not p.container_toolkit.enabled:
        return []
    v = f"{p.container_toolkit.version}-1"
    return _locked(p, "container-toolkit", [
        Pkg(name, v) for name in ("nvidia-container-toolkit", "nvidia-container-toolkit-base",
                                  "libnvidia-container-tools", "libnvidia-container1")])


def dcgm_packages(p: NodeProfile) -> list[Pkg]:
    """What NVIDIA's install (`apt-get install --install-recommends
    datacenter-gpu-manager-4-cuda<major>`) puts on a host, each pinned: gpunode installs
    without Recommends, so the -proprietary packages the -cuda and -core packages recommend
    (profiling, DCP metrics) are named here at the same version; the exporter at the
    release built for this DCGM (model.parts.DCGM_EXPORTER)."""
    if not p.dcgm.enabled:
        return []
    v = f"1:{p.dcgm.version}-1"
    major = p.cuda.version.split(".")[0]
    parts = ["core", f"cuda{major}", "proprietary"]
    if int(major) >= 12:  # NVIDIA builds -proprietary-cuda12 and -cuda13 only
        parts.append(f"proprietary-cuda{major}")
    pkgs = [Pkg(f"datacenter-gpu-manager-4-{part}", v) for part in parts]
    if p.dcgm.exporter:
        pkgs.append(Pkg("datacenter-gpu-manager-exporter", f"{DCGM_EXPORTER[p.dcgm.version]}-1"))
    return _locked(p, "dcgm", pkgs)


def base_packages(p: NodeProfile) -> list[str]:
    """What the rest of the deploy needs, present on every supported OS."""
    pkgs = ["ca-certificates", "curl", "gnupg", "kmod", "pciutils", "numactl",
            "initramfs-tools", "python3", "python3-venv", "python3-apt", "irqbalance"]
    if p.nvidia.source == "cuda-repo":
        pkgs.append("dkms")
    return pkgs


#: The kernel series each Ubuntu release ships as its GA kernel; a newer series on the
#: generic or lowlatency flavour is the HWE kernel, with its own meta-packages.
UBUNTU_GA_SERIES = {"ubuntu-22.04": "5.15", "ubuntu-24.04": "6.8"}


def headers_meta(p: NodeProfile, release: str) -> str:
    """The headers meta-package that follows the flavour of kernel `release` (uname -r)
    through its updates, so DKMS builds the driver for every kernel the host will boot:
    Debian's linux-headers-<flavour> (amd64, cloud-amd64, rt-amd64), Ubuntu's
    linux-headers-<flavour> (generic, lowlatency, aws, nvidia, ...) or, for an HWE
    kernel, linux-headers-<flavour>-hwe-<release>."""
    m = re.match(r"^(\d+\.\d+)\.\d+-\d+-([a-z0-9][a-z0-9-]*)$", release)
    if not m:  # a kernel named outside the distribution's scheme: the default flavour
        return "linux-headers-amd64" if p.os.startswith("debian") else "linux-headers-generic"
    series, flavour = m.groups()
    if p.os.startswith("ubuntu") and flavour in ("generic", "lowlatency") and (
            series != UBUNTU_GA_SERIES[p.os]):
        return f"linux-headers-{flavour}-hwe-{p.os.removeprefix('ubuntu-')}"
    return f"linux-headers-{flavour}"


def header_packages(p: NodeProfile, running: str, installed_kernels: list[str]) -> list[str]:
    """Kernel headers for the running kernel and the newest installed one, and the
    meta-packages that keep headers coming for their flavours."""
    kernels = {running}
    if installed_kernels:
        kernels.add(newest_kernel(installed_kernels))
    metas = sorted({headers_meta(p, k) for k in kernels})
    return [*metas, *sorted(f"linux-headers-{k}" for k in kernels)]


def newest_kernel(kernels: list[str]) -> str:
    def key(version: str) -> tuple[int, ...]:
        return tuple(int(x) for x in "".join(c if c.isdigit() else " " for c in version).split())

    return max(kernels, key=key)


def prebuilt_module_package(p: NodeProfile, kernel: str) -> str:
    """Canonical's signed NVIDIA modules for one kernel (nvidia.source ubuntu-archive)."""
    flavour = "-open" if p.nvidia.open_kernel_modules else ""
    return f"linux-modules-nvidia-{p.nvidia.branch}-server{flavour}-{kernel}"


def module_fix(p: NodeProfile, kernel: str) -> str:
    """The commands that put the NVIDIA module into `kernel`: its prebuilt package from the
    Ubuntu archive, else its headers and a DKMS build (kernel names quoted: host strings)."""
    if p.nvidia.source == "ubuntu-archive":
        return f"apt-get install {shlex.quote(prebuilt_module_package(p, kernel))}"
    k = shlex.quote(kernel)
    return f"apt-get install {shlex.quote('linux-headers-' + kernel)} && dkms autoinstall -k {k}"


def held_packages(p: NodeProfile) -> list[str]:
    """Exact-version packages gpunode holds besides the driver."""
    if not p.nvidia.hold:
        return []
    return [pkg.name for pkg in (nccl_packages(p) + cudnn_packages(p)
                                 + container_toolkit_packages(p) + dcgm_packages(p))
            if pkg.version]


def vllm_build_packages(p: NodeProfile) -> list[str]:
    """What Triton needs on a vLLM node to compile its small C launcher modules at run time
    (with $CC, else gcc, against the venv Python's sysconfig include directory): gcc, and
    libc6-dev for libc's headers and crt files (gcc only recommends it, and gpunode installs
    no recommends). Not build-essential: Triton needs neither g++ nor make nor dpkg-dev.
    Python.h comes from python3.X-dev only when the venv runs the OS's Python: uv prefers
    an installed Python to a download, so it takes the OS's python3 when that is
    vllm.python; any other vllm.python is a python-build-standalone build (downloaded or
    from vllm.python_mirror), which carries its own include directory."""
    if not p.vllm.services:
        return []
    pkgs = ["gcc", "libc6-dev"]
    if p.vllm.python == OS_PYTHON[p.os]:
        pkgs.append(f"python{p.vllm.python}-dev")
    return pkgs


def vllm_requirements(p: NodeProfile) -> str | None:
    """The locked vLLM set as a hash-checked requirements file (None without a lock)."""
    if not p.locked_vllm:
        return None
    return "".join(f"{n}=={pin.version}" + "".join(f" --hash={h}" for h in pin.hashes) + "\n"
                   for n, pin in sorted(p.locked_vllm.items()))


def normalize_dist(name: str) -> str:
    """PEP 503 project name (dist-info directories spell `typing_extensions`, locks
    `typing-extensions`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def venv_off_lock(p: NodeProfile, installed: dict[str, str]) -> list[str]:
    """How a venv (distribution -> version, as the snapshot reads it) differs from the
    locked set, one `name installed (locked version)` line each; [] without a lock."""
    have = {normalize_dist(n): v for n, v in installed.items()}
    want = {n: pin.version for n, pin in p.locked_vllm.items()}
    return [f"{n} {have.get(n) or 'missing'} (locked {want.get(n) or 'nothing'})"
            for n in sorted(set(have) | set(want)) if have.get(n) != want.get(n)]


def venv_current(p: NodeProfile, installed: dict[str, str]) -> bool:
    """Whether a venv is what the site wants: with a lock, exactly the locked set; without,
    vLLM at the site's version."""
    if p.locked_vllm:
        return not venv_off_lock(p, installed)
    return installed.get("vllm", "").startswith(p.vllm.version)


# --- tuning ------------------------------------------------------------------------------

def tuning_profile(p: NodeProfile) -> str:
    if p.tuning.profile != "auto":
        return p.tuning.profile
    return "virtual-guest" if p.kind == "pve-guest" else "accelerator-performance"


#: The socket sysctls of a serving node (tuning.serving_sysctls), and why: the sysctl file
#: carries each reason above its line.
SERVING_SYSCTLS: dict[str, tuple[str, str]] = {
    "net.core.somaxconn": (
        "4096", "accept queue ceiling: a listen() backlog is capped by it (uvicorn, which "
        "serves vLLM's API, asks for 2048); older kernels default to 128"),
    "net.ipv4.tcp_max_syn_backlog": (
        "8192", "half-open connections kept while a burst of clients connects at once"),
    "net.core.netdev_max_backlog": (
        "16384", "packets queued per CPU when a fast NIC outruns the softirq (default 1000)"),
    "net.ipv4.ip_local_port_range": (
        "10240 65535", "ephemeral ports for a proxy or gateway on the node opening one "
        "connection per request (the vLLM ports are reserved out of it)"),
    "net.ipv4.tcp_slow_start_after_idle": (
        "0", "a streamed completion pauses between tokens: keep the congestion window "
        "instead of restarting slow start after each pause"),
    "net.core.rmem_max": ("16777216", "16 MiB socket buffer ceiling (large model downloads "
                          "over long fat paths; streams stay small)"),
    "net.core.wmem_max": ("16777216", "16 MiB socket buffer ceiling, sending side"),
    "net.ipv4.tcp_rmem": ("4096 131072 16777216", "TCP receive autotuning up to 16 MiB"),
    "net.ipv4.tcp_wmem": ("4096 16384 16777216", "TCP send autotuning up to 16 MiB"),
}
RESERVED_PORTS_WHY = ("the vLLM listen ports: never handed out as ephemeral ports, so a "
                      "restarting service always gets its port back")


def port_ranges(ports: list[int]) -> str:
    """Ports as the kernel prints ip_local_reserved_ports: sorted, runs as a-b, comma-joined."""
    runs: list[list[int]] = []
    for port in sorted(set(ports)):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def sysctl_reasons(p: NodeProfile) -> dict[str, str]:
    """Why gpunode sets each of its own serving sysctls (the file's comments)."""
    if not p.tuning.serving_sysctls:
        return {}
    reasons = {key: why for key, (_, why) in SERVING_SYSCTLS.items()}
    if p.vllm.services:
        reasons["net.ipv4.ip_local_reserved_ports"] = RESERVED_PORTS_WHY
    return {k: v for k, v in reasons.items() if k not in p.tuning.sysctl}


def sysctls(p: NodeProfile) -> dict[str, str]:
    """Every sysctl gpunode sets: its defaults, then the profile's map on top."""
    values: dict[str, str] = {
        "vm.swappiness": str(p.tuning.swappiness),
        "kernel.numa_balancing": "1" if p.numa_balancing else "0",
    }
    if tuning_profile(p) in ("accelerator-performance", "throughput-performance"):
        values.update({"vm.dirty_background_ratio": "10", "vm.dirty_ratio": "40"})
    elif tuning_profile(p) == "virtual-guest":
        values.update({"vm.dirty_background_ratio": "10", "vm.dirty_ratio": "30"})
    hp = p.tuning.hugepages
    if hp.size == "2M" and hp.count:
        values["vm.nr_hugepages"] = str(hp.count)
    if p.tuning.serving_sysctls:
        values.update({key: value for key, (value, _) in SERVING_SYSCTLS.items()})
        if p.vllm.services:
            values["net.ipv4.ip_local_reserved_ports"] = port_ranges(
                [s.port for s in p.vllm.services])
    for key, value in p.tuning.sysctl.items():
        values[key] = str(value)
    return dict(sorted(values.items()))


#: Disks by class: the udev KERNEL pattern of the rules file and the same names as a
#: regular expression over /sys/block (whole disks only; partitions are not there).
BLOCK_CLASSES = {
    "nvme": ("nvme[0-9]*n[0-9]*", re.compile(r"nvme\d+n\d+")),
    "other": ("sd[a-z]*|vd[a-z]*|xvd[a-z]*", re.compile(r"(sd|vd|xvd)[a-z]+")),
}


def block_wanted(p: NodeProfile, device: str) -> tuple[str, int] | None:
    """(I/O scheduler, read-ahead KiB) gpunode wants for disk `device` (a /sys/block name),
    or None when it leaves the device alone (another kind of device, or block_io off)."""
    bio = p.tuning.block_io
    if not bio.enabled:
        return None
    for cls, (_, names) in BLOCK_CLASSES.items():
        if names.fullmatch(device):
            return (bio.nvme_scheduler if cls == "nvme" else bio.other_scheduler,
                    bio.read_ahead_kb)
    return None


def kernel_args(p: NodeProfile, thp_default: str | None = None) -> list[str]:
    """Tokens gpunode keeps on the kernel command line. THP's mode only where it differs
    from the running kernel's built-in default (`thp_default`, from its config; None:
    unknown, so it is asked for): asking for the default only costs a GRUB change and a
    reboot. The runtime setting (tmpfiles) applies it either way."""
    args = [] if p.tuning.thp == thp_default else [f"transparent_hugepage={p.tuning.thp}"]
    hp = p.tuning.hugepages
    if hp.size == "1G" and hp.count:
        args += ["default_hugepagesz=1G", "hugepagesz=1G", f"hugepages={hp.count}"]
    seen: list[str] = []
    for token in args:
        if token not in seen:
            seen.append(token)
    return seen


def missing_kernel_args(p: NodeProfile, cmdline: str, thp_default: str | None = None
                        ) -> list[str]:
    current = set(cmdline.split())
    return [t for t in kernel_args(p, thp_default) if t not in current]


# --- units -------------------------------------------------------------------------------

def vllm_unit(name: str) -> str:
    return paths.vllm_unit(name)


def prefetch_unit(name: str) -> str:
    return f"vllm-prefetch@{name}.service"


def vllm_units(p: NodeProfile) -> list[str]:
    return [vllm_unit(s.name) for s in p.vllm.services]


def start_after(p_vllm: dict, service: dict) -> list[str]:
    """The units of the services listed before `service` that share a GPU with it (profile
    JSON data): it starts after them, so vLLM's memory profiling on a shared GPU measures
    one server at a time instead of racing the other."""
    mine = set(service["gpus"])
    before = []
    for other in p_vllm["services"]:
        if other["name"] == service["name"]:
            break
        if mine & set(other["gpus"]):
            before.append(vllm_unit(other["name"]))
    return before


def vllm_config(service: dict) -> dict:
    """The YAML given to `vllm serve --config` for one service (profile JSON data)."""
    cfg: dict = {
        "model": service["model"],
        "served-model-name": service["served_names"] or [service["name"]],
        "host": service["host"],
        "port": service["port"],
        "tensor-parallel-size": service["tensor_parallel_size"],
        "gpu-memory-utilization": service["gpu_memory_utilization"],
        "kv-cache-dtype": service["kv_cache_dtype"],
        "dtype": service["dtype"],
        "shutdown-timeout": 30,
        "disable-access-log-for-endpoints": "/health,/metrics",
    }
    if service.get("revision"):
        cfg["revision"] = service["revision"]
    for key in ("max_model_len", "max_num_seqs", "quantization"):
        if service.get(key) is not None:
            cfg[key.replace("_", "-")] = service[key]
    for key, value in service.get("extra_args", {}).items():
        cfg[key.replace("_", "-")] = value
    return dict(sorted(cfg.items()))


def vllm_environment(p_vllm: dict, service: dict) -> dict[str, str]:
    """Environment of one service (no secrets: the API key arrives as a credential). The
    site's extra_env comes first and gpunode's own values last, so they always win. Only
    variables vLLM or its libraries know: vLLM warns about unknown VLLM_* names, and host
    and port are flags in the service's config."""
    env = dict(service.get("extra_env", {}))
    env |= {
        "HF_HOME": p_vllm["model_cache"],
        "HF_HUB_OFFLINE": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    return dict(sorted(env.items()))


COMPUTE_MODES = {"DEFAULT": "Default", "EXCLUSIVE_PROCESS": "Exclusive_Process",
                 "PROHIBITED": "Prohibited"}


def gpu_settings_drift(p: NodeProfile, gpus: list) -> list[str]:
    """Differences between the profile's GPU settings and what nvidia-smi reports
    (gpus: gpunode.core.topology.Gpu with the GPU_FIELDS values). ECC compares the pending
    mode: a change made is complete until the reboot that applies it."""
    s = p.nvidia.settings
    drift = []
    for g in gpus:
        v = g.values
        pm = "Enabled" if s.persistence else "Disabled"
        if v.get("persistence_mode") != pm:
            drift.append(f"GPU {g.index}: persistence mode {v.get('persistence_mode')}, want {pm}")
        if s.power_limit_w is not None:
            try:
                current = float(v.get("power.limit", "nan"))
            except ValueError:
                current = float("nan")
            if not abs(current - s.power_limit_w) <= 0.5:
                drift.append(f"GPU {g.index}: power limit {v.get('power.limit')} W, want "
                             f"{s.power_limit_w} W")
        if v.get("compute_mode") != COMPUTE_MODES[s.compute_mode]:
            drift.append(f"GPU {g.index}: compute mode {v.get('compute_mode')}, want "
                         f"{COMPUTE_MODES[s.compute_mode]}")
        if s.ecc is not None:
            ecc = "Enabled" if s.ecc else "Disabled"
            if v.get("ecc.mode.pending") != ecc:
                drift.append(f"GPU {g.index}: ECC pending {v.get('ecc.mode.pending')}, want {ecc}")
        if s.application_clocks is not None:
            want = (str(s.application_clocks.graphics_mhz), str(s.application_clocks.memory_mhz))
            have = (v.get("clocks.applications.graphics"), v.get("clocks.applications.memory"))
            if have != want:
                drift.append(f"GPU {g.index}: application clocks {have}, want {want}")
    return drift
