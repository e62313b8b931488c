"""Every file gpunode writes on a node, by concern, rendered from the shared templates.

The deploys ship exactly these, `gpunode render` writes them for review and the checks
compare hosts against them. Files that depend on host facts (GPU UUIDs, GPU-local CPUs)
are included only when the facts are given; the GRUB drop-in depends on the kernel's
built-in THP mode (`thp_default`, None: unknown, so it asks for the profile's)."""

from __future__ import annotations

from dataclasses import dataclass

from gpunode import desired
from gpunode.model import NodeProfile
from gpunode.render import render
from gpunode.topology import Gpu, Placement, format_cpulist, place


@dataclass(frozen=True)
class ManagedFile:
    concern: str
    path: str
    template: str
    content: str
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"


def _file(concern: str, path: str, template: str, node: NodeProfile, mode: int = 0o644,
          group: str = "root", **scope: object) -> ManagedFile:
    return ManagedFile(concern, path, template, render(template, node, **scope), mode,
                       group=group)


def placements(p: NodeProfile, gpus: list[Gpu]) -> dict[str, Placement]:
    pin = p.tuning.cpu_placement == "gpu-local"
    return {s.name: place(s.gpus, gpus, pin) for s in p.vllm.services}


def banned_cpus(p: NodeProfile, gpus: list[Gpu]) -> str:
    """The CPUs irqbalance keeps interrupts off: those pinned to services, unless they are
    every CPU the GPUs' topology knows (a single-socket host, or services on every socket),
    where banning them would leave interrupts nowhere to go: then "" (no ban)."""
    cpus: set[int] = set()
    for placement in placements(p, gpus).values():
        cpus.update(placement.cpus)
    known = {c for g in gpus for c in g.cpus}
    if known and cpus >= known:
        return ""
    return format_cpulist(cpus)


def base_files(p: NodeProfile) -> list[ManagedFile]:
    return [
        _file("base", "/etc/apt/apt.conf.d/51gpunode-unattended-upgrades",
              "base/51gpunode-unattended-upgrades.j2", p),
        _file("base", "/etc/apt/apt.conf.d/99gpunode-apt", "base/99gpunode-apt.j2", p),
    ]


def driver_files(p: NodeProfile) -> list[ManagedFile]:
    files = [
        _file("nvidia_driver", desired.NOUVEAU_BLACKLIST,
              "nvidia_driver/blacklist-nouveau.conf.j2", p),
        _file("nvidia_driver", "/etc/systemd/system/nvidia-persistenced.service.d/gpunode.conf",
              "nvidia_driver/nvidia-persistenced.conf.j2", p),
        _file("nvidia_driver", desired.MODULES_LOAD, "nvidia_driver/gpunode-nvidia.conf.j2", p),
    ]
    if p.nvidia.source == "cuda-repo":
        files.append(_file("nvidia_driver", desired.cuda_repo_list_path(p),
                           "nvidia_driver/cuda-repo.list.j2", p))
    if desired.debian_contrib(p):
        files.append(_file("nvidia_driver", desired.DEBIAN_CONTRIB_SOURCES,
                           "nvidia_driver/gpunode-debian-contrib.sources.j2", p))
    if p.nvidia.version:
        files.append(_file("nvidia_driver", "/etc/apt/preferences.d/gpunode-nvidia-driver",
                           "nvidia_driver/gpunode-nvidia-driver.pref.j2", p))
    return files


def gpu_settings_files(p: NodeProfile) -> list[ManagedFile]:
    return [
        _file("gpu_settings", "/etc/gpunode/gpu-settings.json",
              "gpu_settings/gpu-settings.json.j2", p),
        _file("gpu_settings", "/usr/local/sbin/gpunode-gpu-settings",
              "gpu_settings/gpunode-gpu-settings.j2", p, mode=0o755),
        _file("gpu_settings", "/etc/systemd/system/gpunode-gpu-settings.service",
              "gpu_settings/gpunode-gpu-settings.service.j2", p),
    ]


def container_toolkit_files(p: NodeProfile) -> list[ManagedFile]:
    if not p.container_toolkit.enabled:
        return []
    return [_file("container_toolkit", "/etc/apt/sources.list.d/nvidia-container-toolkit.list",
                  "container_toolkit/nvidia-container-toolkit.list.j2", p)]


def tuning_files(p: NodeProfile, gpus: list[Gpu] | None = None,
                 thp_default: str | None = None) -> list[ManagedFile]:
    files = [
        _file("tuning", "/etc/sysctl.d/60-gpunode.conf", "tuning/60-gpunode.conf.j2", p),
        _file("tuning", desired.GRUB_CFG, "tuning/60-gpunode-grub.cfg.j2", p,
              kernel_args=" ".join(desired.kernel_args(p, thp_default))),
        _file("tuning", "/etc/tmpfiles.d/gpunode-tuning.conf", "tuning/gpunode-tuning.conf.j2", p),
        _file("tuning", "/etc/security/limits.d/60-gpunode.conf",
              "tuning/60-gpunode-limits.conf.j2", p),
    ]
    if p.tuning.governor:
        files.append(_file("tuning", desired.CPU_GOVERNOR_UNIT_PATH,
                           "tuning/gpunode-cpu-governor.service.j2", p))
    if gpus is not None and p.tuning.irqbalance == "ban-service-cpus":
        cpus = banned_cpus(p, gpus)
        if cpus:
            files.append(_file("tuning", "/etc/systemd/system/irqbalance.service.d/gpunode.conf",
                               "tuning/irqbalance.conf.j2", p, banned_cpus=cpus))
    return files


def vllm_files(p: NodeProfile, gpus: list[Gpu] | None = None) -> list[ManagedFile]:
    if not p.vllm.services:
        return []
    files = [
        _file("vllm", "/etc/systemd/system/vllm@.service", "vllm/vllm@.service.j2", p),
        _file("vllm", "/etc/systemd/system/vllm-prefetch@.service",
              "vllm/vllm-prefetch@.service.j2", p),
        _file("vllm", "/usr/local/lib/gpunode/vllm-start", "vllm/vllm-start.j2", p, mode=0o755),
        _file("vllm", "/usr/local/lib/gpunode/vllm-wait-ready", "vllm/vllm-wait-ready.j2", p,
              mode=0o755),
        _file("vllm", "/usr/local/lib/gpunode/vllm-prefetch", "vllm/vllm-prefetch.j2", p,
              mode=0o755),
    ]
    where = placements(p, gpus) if gpus is not None else {}
    data = p.model_dump(mode="json")
    for svc, svc_data in zip(p.vllm.services, data["vllm"]["services"], strict=True):
        files += [
            _file("vllm", f"/etc/vllm/{svc.name}.yaml", "vllm/service.yaml.j2", p,
                  mode=0o640, group=p.vllm.user, service=svc_data),
            _file("vllm", f"/etc/vllm/{svc.name}.env", "vllm/service.env.j2", p,
                  mode=0o640, group=p.vllm.user, service=svc_data),
        ]
        if svc.name in where:
            files.append(_file("vllm", f"/etc/systemd/system/vllm@{svc.name}.service.d/gpunode.conf",
                               "vllm/instance.conf.j2", p, service=svc_data,
                               placement_lines=where[svc.name].unit_lines()))
    return files


def node_files(p: NodeProfile, gpus: list[Gpu] | None = None,
               thp_default: str | None = None) -> list[ManagedFile]:
    """All files for a node, in deploy order."""
    return (base_files(p) + tuning_files(p, gpus, thp_default) + driver_files(p) + gpu_settings_files(p)
            + container_toolkit_files(p) + vllm_files(p, gpus))


def credential_path(service_name: str) -> str:
    return f"/etc/vllm/credentials/{service_name}.key"


#: The node's Hugging Face token (vllm.hf_token_file) as a credential of the prefetch and
#: server units; no ".key" suffix, so no service's API key can share its path.
HF_TOKEN_PATH = "/etc/vllm/credentials/hf-token"


@dataclass(frozen=True)
class Credential:
    path: str  # on the node: root-only (0600), handed to units by LoadCredential=
    source: str  # on the control machine; its content never leaves it except into path
    what: str  # for task names
    field: str  # the site field naming source, for messages


def credentials(p: NodeProfile) -> list[Credential]:
    """The secret files the vLLM concern installs; both engines install exactly these."""
    if not p.vllm.services:
        return []
    out = [Credential(credential_path(s.name), s.api_key_file, f"the API key of {s.name}",
                      f"vllm service {s.name}: api_key_file")
           for s in p.vllm.services if s.api_key_file]
    if p.vllm.hf_token_file:
        out.append(Credential(HF_TOKEN_PATH, p.vllm.hf_token_file, "the Hugging Face token",
                              "vllm.hf_token_file"))
    return out
