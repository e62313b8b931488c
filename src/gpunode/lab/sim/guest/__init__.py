"""Guest-side files of the simulated NVIDIA stack (SIMULATION), for the .deb packager.

Every script here is a standalone python3 (stdlib) program. The packager installs
``gpunode_sim.py`` into /usr/lib/gpunode-sim/ (every simulated package may ship it; the
content is identical, or one common package carries it) and each tool at the real path
listed in :data:`INSTALL`. File contents come from :func:`read`, :func:`nccl_files`,
:func:`installed_marker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

LIB_DIR = "/usr/lib/gpunode-sim"


@dataclass(frozen=True)
class GuestFile:
    source: str  # file name in this directory
    dest: str  # absolute path in the guest
    mode: int
    package: str  # the real package that ships the real file (suggestion for the packager)


INSTALL: tuple[GuestFile, ...] = (
    GuestFile("gpunode_sim.py", f"{LIB_DIR}/gpunode_sim.py", 0o644, "(every simulated package)"),
    GuestFile("nvidia-smi", "/usr/bin/nvidia-smi", 0o755, "nvidia-driver-cuda"),
    GuestFile(
        "gpunode-sim-boot",
        f"{LIB_DIR}/gpunode-sim-boot",
        0o755,
        "nvidia-kernel-open-dkms / nvidia-kernel-dkms (the kmod packages)",
    ),
    GuestFile(
        "gpunode-sim-boot.service",
        "/usr/lib/systemd/system/gpunode-sim-boot.service",
        0o644,
        "the kmod packages; postinst: systemctl enable gpunode-sim-boot.service",
    ),
    GuestFile("nvidia-persistenced", "/usr/bin/nvidia-persistenced", 0o755, "nvidia-persistenced"),
    GuestFile(
        "nvidia-persistenced.service",
        "/usr/lib/systemd/system/nvidia-persistenced.service",
        0o644,
        "nvidia-persistenced (no [Install]: static, as shipped)",
    ),
    GuestFile("nvcc", "/usr/local/cuda-13.0/bin/nvcc", 0o755, "cuda-nvcc-13-0"),
    GuestFile("nvidia-ctk", "/usr/bin/nvidia-ctk", 0o755, "nvidia-container-toolkit-base"),
    GuestFile("dcgmi", "/usr/bin/dcgmi", 0o755, "datacenter-gpu-manager-4-core"),
    GuestFile("nv-hostengine", "/usr/bin/nv-hostengine", 0o755, "datacenter-gpu-manager-4-core"),
    GuestFile(
        "nvidia-container-runtime",
        "/usr/bin/nvidia-container-runtime",
        0o755,
        "nvidia-container-toolkit-base",
    ),
    GuestFile("nvidia-container-cli", "/usr/bin/nvidia-container-cli", 0o755, "libnvidia-container-tools"),
    GuestFile("nvidia-modprobe", "/usr/bin/nvidia-modprobe", 0o755, "nvidia-modprobe"),
)


def read(source: str) -> str:
    """Text of one file of this directory (a :attr:`GuestFile.source`)."""
    return resources.files(__package__).joinpath(source).read_text(encoding="utf-8")


def installed_marker(component: str, value: str) -> tuple[str, str]:
    """(path, content) of the one-line marker a simulated package writes.

    component: driver (user-space version, e.g. 580.95.05), kmod ("580.95.05 open" or
    "580.95.05 proprietary"), cuda (13.0.88), nccl (2.28.3), ctk (1.17.8), dcgm (4.4.2).
    """
    return f"{LIB_DIR}/installed/{component}", value.strip() + "\n"


def nccl_version_code(version: str) -> int:
    major, minor, patch = (int(x) for x in version.split(".")[:3])
    if major <= 2 and minor <= 8:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


def nccl_header(version: str, suffix: str = "") -> str:
    """/usr/include/nccl.h: the version macros as in NVIDIA/nccl src/nccl.h.in (SIMULATION)."""
    major, minor, patch = version.split(".")[:3]
    return (
        "/* SIMULATION (gpunode lab): stand-in for NCCL's nccl.h; version macros only. */\n"
        "#ifndef NCCL_H_\n#define NCCL_H_\n\n"
        f"#define NCCL_MAJOR {int(major)}\n"
        f"#define NCCL_MINOR {int(minor)}\n"
        f"#define NCCL_PATCH {int(patch)}\n"
        f'#define NCCL_SUFFIX "{suffix}"\n\n'
        f"#define NCCL_VERSION_CODE {nccl_version_code(version)}\n"
        "#define NCCL_VERSION(X,Y,Z) (((X) <= 2 && (Y) <= 8) ? (X) * 1000 + (Y) * 100 + (Z) : "
        "(X) * 10000 + (Y) * 100 + (Z))\n\n"
        "#endif\n"
    )


def nccl_files(version: str) -> dict[str, dict[str, str]]:
    """Files of libnccl2 / libnccl-dev: {package: {path: content, or 'symlink:' + target}}.

    The shared objects are placeholders (text, not ELF): nothing in the lab loads them.
    """
    lib = "/usr/lib/x86_64-linux-gnu"
    major = version.split(".")[0]
    real = f"libnccl.so.{version}"
    return {
        "libnccl2": {
            f"{lib}/{real}": f"SIMULATION: placeholder for NCCL {version} (gpunode lab)\n",
            f"{lib}/libnccl.so.{major}": f"symlink:{real}",
        },
        "libnccl-dev": {
            "/usr/include/nccl.h": nccl_header(version),
            f"{lib}/libnccl.so": f"symlink:libnccl.so.{major}",
        },
    }
