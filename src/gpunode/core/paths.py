"""Every host path gpunode writes or reads, in one place.

Product modules, the checks and the Ansible roles' data (gpunode_desired facts) take their
paths from here; nothing else spells them (tests/unit/test_paths.py greps for it). A path
that depends on the profile or on a vLLM service is a small function of it. This module
imports nothing of gpunode's, so any module may import it."""

from __future__ import annotations

from pathlib import PurePosixPath

SYSTEMD_DIR = "/etc/systemd/system"
# where apt reads sources and pins: a change there needs fresh lists
APT_SOURCE_DIRS = ("/etc/apt/sources.list.d/", "/etc/apt/preferences.d/")
#: gpunode's own state: stamps and the node manifest.
STAMPS = "/var/lib/gpunode"
MANIFEST_PATH = f"{STAMPS}/manifest.json"
#: The drop-in name gpunode gives every unit it extends.
DROPIN_NAME = "gpunode.conf"


def stamp_path(name: str) -> str:
    return f"{STAMPS}/{name}.stamp"


def unit_path(unit: str) -> str:
    return f"{SYSTEMD_DIR}/{unit}"


def dropin_dir(unit: str) -> str:
    return f"{SYSTEMD_DIR}/{unit}.d"


def unit_dropin(unit: str) -> str:
    """gpunode's drop-in for `unit` (a full unit name)."""
    return f"{dropin_dir(unit)}/{DROPIN_NAME}"


def wants_glob(target: str) -> str:
    return f"{SYSTEMD_DIR}/{target}.wants/*"


def wants_link(target: str, unit: str) -> str:
    return f"{SYSTEMD_DIR}/{target}.wants/{unit}"


# base
APT_UNATTENDED = "/etc/apt/apt.conf.d/51gpunode-unattended-upgrades"
APT_CONF = "/etc/apt/apt.conf.d/99gpunode-apt"

# tuning
SYSCTL_CONF = "/etc/sysctl.d/60-gpunode.conf"
#: udev rules setting the disks' I/O scheduler and read-ahead (tuning.block_io).
BLOCK_RULES = "/etc/udev/rules.d/60-gpunode-block.rules"
#: gpunode's GRUB drop-in with the kernel arguments it keeps (GPU nodes).
GRUB_CFG = "/etc/default/grub.d/60-gpunode.cfg"
TMPFILES_CONF = "/etc/tmpfiles.d/gpunode-tuning.conf"
LIMITS_CONF = "/etc/security/limits.d/60-gpunode.conf"
#: The oneshot unit that sets the CPU governor late in boot (after what else sets it).
CPU_GOVERNOR_UNIT = "gpunode-cpu-governor.service"
CPU_GOVERNOR_UNIT_PATH = unit_path(CPU_GOVERNOR_UNIT)
IRQBALANCE_UNIT = "irqbalance.service"
IRQ_DROPIN = unit_dropin(IRQBALANCE_UNIT)

# NVIDIA driver
#: gpunode's nouveau blacklist (copied into the initramfs by update-initramfs).
NOUVEAU_BLACKLIST = "/etc/modprobe.d/blacklist-nouveau.conf"
#: Every nouveau blacklist on the host (gpunode's and the driver packages').
NOUVEAU_BLACKLISTS = "/etc/modprobe.d/*nouveau*.conf"
# nvidia.ko creates no /dev/nvidia-uvm*: nvidia-uvm is loaded at boot from this file and
# the GPU settings unit creates the nodes (nvidia-modprobe -u -c=0) before any vLLM unit.
MODULES_LOAD = "/etc/modules-load.d/gpunode-nvidia.conf"
PERSISTENCED_UNIT = "nvidia-persistenced.service"
PERSISTENCED_DROPIN = unit_dropin(PERSISTENCED_UNIT)
DRIVER_PIN = "/etc/apt/preferences.d/gpunode-nvidia-driver"
CUDA_KEYRING = "/usr/share/keyrings/cuda-archive-keyring.gpg"
#: The Debian archive's contrib component, in a file of its own beside the host's sources
#: (which gpunode leaves alone, whatever their format).
DEBIAN_CONTRIB_SOURCES = "/etc/apt/sources.list.d/gpunode-debian-contrib.sources"
#: Debian's archive keyring (debian-archive-keyring, on every Debian 12 host).
DEBIAN_ARCHIVE_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: The certificate DKMS signs its modules with, which Secure Boot needs enrolled: Ubuntu's
#: shim-signed MOK, Debian's dkms-generated key.
DKMS_MOK_CERT = {"ubuntu": "/var/lib/shim-signed/mok/MOK.der", "debian": "/var/lib/dkms/mok.pub"}


def cuda_repo_list(distro: str) -> str:
    """NVIDIA's CUDA repository source for a distro id (e.g. "ubuntu2404")."""
    return f"/etc/apt/sources.list.d/cuda-{distro}-x86_64.list"


def cuda_toolkit_prefix(version: str) -> str:
    return f"/usr/local/cuda-{version}"


# GPU settings
GPU_SETTINGS_UNIT = "gpunode-gpu-settings.service"
GPU_SETTINGS_JSON = "/etc/gpunode/gpu-settings.json"
GPU_SETTINGS_SCRIPT = "/usr/local/sbin/gpunode-gpu-settings"
GPU_SETTINGS_UNIT_PATH = unit_path(GPU_SETTINGS_UNIT)

# container toolkit
CTK_SOURCES = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
CTK_KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
#: Where `nvidia-ctk runtime configure` (toolkit 1.18) puts the nvidia runtime: docker's
#: daemon.json in place; drop-ins for containerd (imported from its config.toml) and CRI-O.
RUNTIME_CONFIG = {"docker": "/etc/docker/daemon.json",
                  "containerd": "/etc/containerd/conf.d/99-nvidia.toml",
                  "crio": "/etc/crio/conf.d/99-nvidia.toml"}
#: containerd's own configuration, which must import RUNTIME_CONFIG["containerd"].
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
#: Toolkit 1.18's nvidia-cdi-refresh.service writes the CDI spec here (a tmpfs: it runs at
#: every boot, and its .path unit starts it again when the kernel's modules.dep or nvidia-ctk
#: change). Source: the toolkit's deployments/systemd units and .install files (research
#: nvidia-repo.md §5.4).
CDI_SPEC = "/var/run/cdi/nvidia.yaml"
#: Where gpunode wrote the spec itself (`nvidia-ctk cdi generate`) before, as it still does
#: for toolkit 1.17, which ships no refresh units. Beside CDI_SPEC it would list every
#: device twice.
ETC_CDI_SPEC = "/etc/cdi/nvidia.yaml"

# vLLM
VLLM_ETC = "/etc/vllm"
VLLM_CREDENTIALS = f"{VLLM_ETC}/credentials"
#: The service user's home, HF_HOME's default parent.
VLLM_HOME = "/var/lib/vllm"
VLLM_CONFIG_GLOB = f"{VLLM_ETC}/*.yaml"
VLLM_TEMPLATE_UNIT = unit_path("vllm@.service")
PREFETCH_TEMPLATE_UNIT = unit_path("vllm-prefetch@.service")
TEMPLATE_UNITS = (VLLM_TEMPLATE_UNIT, PREFETCH_TEMPLATE_UNIT)
VLLM_LIBEXEC = "/usr/local/lib/gpunode"
VLLM_START = f"{VLLM_LIBEXEC}/vllm-start"
VLLM_WAIT_READY = f"{VLLM_LIBEXEC}/vllm-wait-ready"
VLLM_PREFETCH = f"{VLLM_LIBEXEC}/vllm-prefetch"
#: The scripts a running vLLM unit executes (a change restarts it).
SCRIPTS = (VLLM_START, VLLM_WAIT_READY)
#: The node's Hugging Face token (vllm.hf_token_file) as a credential of the prefetch and
#: server units; no ".key" suffix, so no service's API key can share its path.
HF_TOKEN_PATH = f"{VLLM_CREDENTIALS}/hf-token"


def vllm_unit(name: str) -> str:
    return f"vllm@{name}.service"


def vllm_config(name: str) -> str:
    return f"{VLLM_ETC}/{name}.yaml"


def vllm_env(name: str) -> str:
    return f"{VLLM_ETC}/{name}.env"


def vllm_unit_dropin(name: str) -> str:
    """The placement drop-in of service `name` (GPU UUIDs, CPUs, NUMA)."""
    return unit_dropin(vllm_unit(name))


def credential_path(name: str) -> str:
    """The API key of service `name`, as a systemd credential."""
    return f"{VLLM_CREDENTIALS}/{name}.key"


def service_of_config(path: str) -> str:
    """The service a config found by VLLM_CONFIG_GLOB on a host belongs to."""
    return PurePosixPath(path).stem


def service_paths(name: str) -> list[str]:
    """What removing service `name` deletes: its config, env, key and unit drop-ins."""
    return [vllm_config(name), vllm_env(name), credential_path(name),
            dropin_dir(vllm_unit(name))]


# Proxmox VE host
PVE_VFIO_CONF = "/etc/modprobe.d/gpunode-vfio.conf"
PVE_BLACKLIST_CONF = "/etc/modprobe.d/gpunode-gpu-blacklist.conf"
PVE_MODULES_CONF = "/etc/modules-load.d/gpunode-vfio.conf"
PVE_GRUB_CFG = "/etc/default/grub.d/60-gpunode-pve.cfg"
KERNEL_CMDLINE = "/etc/kernel/cmdline"  # systemd-boot via proxmox-boot-tool
