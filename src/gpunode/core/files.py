"""Every file gpunode writes on a node, by concern, rendered from the shared templates.

The deploys ship exactly these, `gpunode render` writes them for review and the checks
compare hosts against them. Files that depend on host facts (GPU UUIDs, GPU-local CPUs)
are included only when the facts are given; the GRUB drop-in depends on the kernel's
built-in THP mode (`thp_default`, None: unknown, so it asks for the profile's)."""

from __future__ import annotations

from dataclasses import dataclass

from gpunode.core import desired, paths
from gpunode.core.render import render
from gpunode.core.topology import Gpu, Placement, format_cpulist, place
from gpunode.model import NodeProfile


@dataclass(frozen=True)
class ManagedFile:
    """A file gpunode writes, with its identity: `scope` "node" (one per node) or
    "service" (one per vLLM service, named by `service`), and `restart`, the units a
    change of it restarts (set where the file is made, never parsed back from its path)."""

    concern: str
    path: str
    template: str
    content: str
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    scope: str = "node"
    service: str | None = None
    restart: tuple[str, ...] = ()

    @property
    def apt_source(self) -> bool:
        """An apt source or pin: apt needs fresh lists after it changed."""
        return self.path.startswith(paths.APT_SOURCE_DIRS)

    @property
    def systemd_unit(self) -> bool:
        """A unit or drop-in: systemd needs a daemon-reload after it changed."""
        return self.path.startswith(paths.SYSTEMD_DIR + "/")


def _file(concern: str, path: str, template: str, node: NodeProfile, mode: int = 0o644,
          group: str = "root", restart: tuple[str, ...] = (), **scope: object) -> ManagedFile:
    return ManagedFile(concern, path, template, render(template, node, **scope), mode,
                       group=group, restart=restart)


def _service_file(concern: str, path: str, template: str, node: NodeProfile, name: str,
                  mode: int = 0o644, group: str = "root", **scope: object) -> ManagedFile:
    """A file of vLLM service `name`: a change restarts its unit."""
    return ManagedFile(concern, path, template, render(template, node, **scope), mode,
                       group=group, scope="service", service=name,
                       restart=(paths.vllm_unit(name),))


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
        _file("base", paths.APT_UNATTENDED,
              "base/51gpunode-unattended-upgrades.j2", p),
        _file("base", paths.APT_CONF, "base/99gpunode-apt.j2", p),
    ]


def driver_files(p: NodeProfile) -> list[ManagedFile]:
    files = [
        _file("nvidia_driver", paths.NOUVEAU_BLACKLIST,
              "nvidia_driver/blacklist-nouveau.conf.j2", p),
        _file("nvidia_driver", paths.PERSISTENCED_DROPIN,
              "nvidia_driver/nvidia-persistenced.conf.j2", p,
              restart=(paths.PERSISTENCED_UNIT,)),
        _file("nvidia_driver", paths.MODULES_LOAD, "nvidia_driver/gpunode-nvidia.conf.j2", p),
    ]
    if p.nvidia.source == "cuda-repo":
        files.append(_file("nvidia_driver", desired.cuda_repo_list_path(p),
                           "nvidia_driver/cuda-repo.list.j2", p))
    if desired.debian_contrib(p):
        files.append(_file("nvidia_driver", paths.DEBIAN_CONTRIB_SOURCES,
                           "nvidia_driver/gpunode-debian-contrib.sources.j2", p))
    if p.nvidia.version:
        files.append(_file("nvidia_driver", paths.DRIVER_PIN,
                           "nvidia_driver/gpunode-nvidia-driver.pref.j2", p))
    return files


def gpu_settings_files(p: NodeProfile) -> list[ManagedFile]:
    return [
        _file("gpu_settings", paths.GPU_SETTINGS_JSON,
              "gpu_settings/gpu-settings.json.j2", p),
        _file("gpu_settings", paths.GPU_SETTINGS_SCRIPT,
              "gpu_settings/gpunode-gpu-settings.j2", p, mode=0o755),
        _file("gpu_settings", paths.GPU_SETTINGS_UNIT_PATH,
              "gpu_settings/gpunode-gpu-settings.service.j2", p),
    ]


def container_toolkit_files(p: NodeProfile) -> list[ManagedFile]:
    if not p.container_toolkit.enabled:
        return []
    return [_file("container_toolkit", paths.CTK_SOURCES,
                  "container_toolkit/nvidia-container-toolkit.list.j2", p)]


def irq_dropin(p: NodeProfile, cpus: str) -> ManagedFile:
    """irqbalance's drop-in banning `cpus` (a CPU list) from interrupts."""
    return _file("tuning", paths.IRQ_DROPIN, "tuning/irqbalance.conf.j2", p,
                 restart=(paths.IRQBALANCE_UNIT,), banned_cpus=cpus)


def tuning_files(p: NodeProfile, gpus: list[Gpu] | None = None,
                 thp_default: str | None = None) -> list[ManagedFile]:
    files = [
        _file("tuning", paths.SYSCTL_CONF, "tuning/60-gpunode.conf.j2", p),
        _file("tuning", paths.GRUB_CFG, "tuning/60-gpunode-grub.cfg.j2", p,
              kernel_args=" ".join(desired.kernel_args(p, thp_default))),
        _file("tuning", paths.TMPFILES_CONF, "tuning/gpunode-tuning.conf.j2", p),
        _file("tuning", paths.LIMITS_CONF,
              "tuning/60-gpunode-limits.conf.j2", p),
    ]
    if p.tuning.block_io.enabled:
        files.append(_file("tuning", paths.BLOCK_RULES, "tuning/60-gpunode-block.rules.j2", p))
    if p.tuning.governor:
        files.append(_file("tuning", paths.CPU_GOVERNOR_UNIT_PATH,
                           "tuning/gpunode-cpu-governor.service.j2", p))
    if gpus is not None and p.tuning.irqbalance == "ban-service-cpus":
        cpus = banned_cpus(p, gpus)
        if cpus:
            files.append(irq_dropin(p, cpus))
    return files


def vllm_files(p: NodeProfile, gpus: list[Gpu] | None = None) -> list[ManagedFile]:
    if not p.vllm.services:
        return []
    every = tuple(paths.vllm_unit(s.name) for s in p.vllm.services)
    files = [
        _file("vllm", paths.VLLM_TEMPLATE_UNIT, "vllm/vllm@.service.j2", p, restart=every),
        _file("vllm", paths.PREFETCH_TEMPLATE_UNIT, "vllm/vllm-prefetch@.service.j2", p,
              restart=every),
        _file("vllm", paths.VLLM_START, "vllm/vllm-start.j2", p, mode=0o755, restart=every),
        _file("vllm", paths.VLLM_WAIT_READY, "vllm/vllm-wait-ready.j2", p, mode=0o755,
              restart=every),
        _file("vllm", paths.VLLM_PREFETCH, "vllm/vllm-prefetch.j2", p, mode=0o755),
    ]
    where = placements(p, gpus) if gpus is not None else {}
    data = p.model_dump(mode="json")
    for svc, svc_data in zip(p.vllm.services, data["vllm"]["services"], strict=True):
        files += [
            _service_file("vllm", paths.vllm_config(svc.name), "vllm/service.yaml.j2", p,
                          svc.name, mode=0o640, group=p.vllm.user, service=svc_data),
            _service_file("vllm", paths.vllm_env(svc.name), "vllm/service.env.j2", p,
                          svc.name, mode=0o640, group=p.vllm.user, service=svc_data),
        ]
        if svc.name in where:
            files.append(instance_dropin(p, svc.name, svc_data, where[svc.name]))
    return files


def instance_dropin(p: NodeProfile, name: str, svc_data: dict[str, object],
                    where: Placement) -> ManagedFile:
    """The placement drop-in of service `name` (its GPUs' UUIDs, CPUs and NUMA node)."""
    return _service_file("vllm", paths.vllm_unit_dropin(name), "vllm/instance.conf.j2", p,
                         name, service=svc_data, placement_lines=where.unit_lines())


def restart_inputs(p: NodeProfile, name: str) -> list[str]:
    """What restarts service `name` when it changed: every managed file naming its unit
    in `restart` (its placement drop-in too, whatever the host's GPUs), its API key and
    the Hugging Face token."""
    unit = paths.vllm_unit(name)
    files = [f for f in vllm_files(p) if unit in f.restart]
    return [*(f.path for f in files if f.service == name), paths.vllm_unit_dropin(name),
            paths.credential_path(name), paths.HF_TOKEN_PATH,
            *(f.path for f in files if f.scope == "node")]


def node_files(p: NodeProfile, gpus: list[Gpu] | None = None,
               thp_default: str | None = None) -> list[ManagedFile]:
    """All files for a node, in deploy order."""
    return (base_files(p) + tuning_files(p, gpus, thp_default) + driver_files(p) + gpu_settings_files(p)
            + container_toolkit_files(p) + vllm_files(p, gpus))



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
    out = [Credential(paths.credential_path(s.name), s.api_key_file, f"the API key of {s.name}",
                      f"vllm service {s.name}: api_key_file")
           for s in p.vllm.services if s.api_key_file]
    if p.vllm.hf_token_file:
        out.append(Credential(paths.HF_TOKEN_PATH, p.vllm.hf_token_file, "the Hugging Face token",
                              "vllm.hf_token_file"))
    return out
