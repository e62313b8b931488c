"""Engine-neutral plans: what must happen on one host, decided once from its snapshot.

A concern's planner is a pure function `(profile, snapshot) -> list[Step]`: no pyinfra, no
Ansible, no SSH. Each step says what it is (a file, a command, a reboot, a stop), whether it
is needed on this host and why. The engines only execute the needed steps in order: the
pyinfra deploy through `gpunode.engines.pyinfra.steps`, the Ansible roles by looping over the list
the `gpunode_plan` action returns (standard modules, no decisions of their own).

Planners are re-run by the pyinfra engine before each step at execution time (on the
snapshot as changed so far), so a step that depends on an earlier one (a rebuild after a
file changed, a reboot after both) is decided from host state, never remembered."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gpunode.core import desired as d
from gpunode.core import paths
from gpunode.core.hostcmd import DKMS_OFFER_KEY, OS_IDS, nccl_available
from gpunode.core.paths import stamp_path
from gpunode.facts import Snapshot
from gpunode.model import NodeProfile

StepKind = Literal["file", "command", "reboot", "stop"]


@dataclass(frozen=True)
class Step:
    """One action on a host. `key` is stable across re-plans of the same host."""

    key: str
    concern: str
    kind: StepKind
    title: str
    needed: bool
    why: str
    path: str = ""
    content: str = ""
    mode: str = "0644"
    owner: str = "root"
    group: str = "root"
    command: str = ""
    message: str = ""  # stop: the host's error
    reasons: list[str] = field(default_factory=list)  # reboot
    timeout_s: int = 0  # reboot

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_differs(snap: Snapshot, path: str, digest: str, mode: str, owner: str,
                 group: str) -> str:
    """How the host's file differs from one with this sha256, mode and owner ("": it
    does not)."""
    cur = snap.file(path)
    if cur is None:
        return "missing"
    if cur.get("dir"):
        return "a directory is in the way"
    if cur.get("sha256") != digest:
        return "content differs"
    if (cur["mode"], cur["owner"], cur["group"]) != (mode, owner, group):
        return f"mode/owner {cur['mode']} {cur['owner']}:{cur['group']}"
    return ""


def file_step(concern: str, snap: Snapshot, path: str, content: str, mode: str = "0644",
              owner: str = "root", group: str = "root") -> Step:
    """A file with exactly this content and mode; needed when the host's differs."""
    why = file_differs(snap, path, sha256(content), mode, owner, group)
    return Step(key=f"file:{path}", concern=concern, kind="file", title=f"Write {path}",
                needed=bool(why), why=why or "as rendered", path=path, content=content,
                mode=mode, owner=owner, group=group)


def unit_state(snap: Snapshot, name: str) -> dict[str, bool]:
    """A unit as the engines act on it: enabled (by its [Install]), static, active, loaded."""
    state = snap.unit(name)
    return {"enabled": state.get("UnitFileState") in ("enabled", "enabled-runtime"),
            "static": state.get("UnitFileState") == "static",
            "active": state.get("ActiveState") == "active",
            "loaded": state.get("LoadState") == "loaded"}


def dir_differs(snap: Snapshot, path: str, mode: str, owner: str, group: str) -> bool:
    """The host lacks this directory with exactly this mode and owner."""
    cur = snap.file(path)
    return not (cur and cur.get("dir") and cur["mode"] == mode and cur["owner"] == owner
                and cur["group"] == group)


def stop_step(concern: str, key: str, message: str) -> Step:
    """Stop this host here with `message` (exit 1 for it; the other hosts go on). Keys:
    `refuse` (before anything changes: the only step), `reboot-refused` (a reboot is due
    and the policy forbids it), `verify` (after everything else: not ready)."""
    return Step(key=key, concern=concern, kind="stop", title="Stop this host", needed=True,
                why=message, message=message)


def reboot_message(p: NodeProfile, reasons: list[str]) -> str:
    """Why a host that needs a reboot stops when its policy is 'never' (every concern)."""
    return (f"{p.name} needs a reboot ({'; '.join(reasons)}) and its reboot policy is "
            "'never': reboot it, then run the deploy again")


def kernels_without_module(p: NodeProfile, snap: Snapshot) -> list[str]:
    """Installed kernels that lack the NVIDIA module and matter: the one the host boots
    next (the newest) and, with DKMS (cuda-repo), every one with headers, for which DKMS
    should have built it. The Ubuntu archive's prebuilt modules come per kernel ABI, not
    with headers (its meta-package follows the newest kernel; the running one gets headers
    from gpunode). Empty before the driver is installed and in snapshots without the field."""
    mods = snap.kernel_modules
    if not mods or not snap.driver_installed(p):
        return []
    boot = d.newest_kernel(list(mods))
    dkms = p.nvidia.source == "cuda-repo"
    return sorted(k for k, m in mods.items()
                  if ((dkms and m["headers"]) or k == boot) and not m["nvidia"])


def reboot_refusal(p: NodeProfile, snap: Snapshot, reasons: list[str]) -> str | None:
    """Why a host that needs a reboot must not reboot now (None: it may): a kernel it may
    boot lacks the NVIDIA module, so its GPUs would be gone after the reboot."""
    lacking = kernels_without_module(p, snap) if reasons else []
    if not lacking:
        return None
    boot = d.newest_kernel(list(snap.kernel_modules))
    fixes = "; ".join(d.module_fix(p, k) for k in lacking)
    return (f"{p.name} needs a reboot ({'; '.join(reasons)}) but the NVIDIA kernel module is "
            f"missing for kernel {', '.join(lacking)} (it boots {boot} next), so its GPUs "
            f"would be gone after the reboot; not rebooting. Put the module in place ({fixes}), "
            "then run the deploy again")


def find(steps: list[Step], key: str) -> Step | None:
    return next((s for s in steps if s.key == key), None)


def planner(concern: str) -> Callable[[NodeProfile, Snapshot], list[Step]]:
    """The planner of a concern that is written as a plan (both engines run it)."""
    from gpunode.core import pve_host

    planners = {pve_host.CONCERN: pve_host.plan}
    if concern not in planners:
        raise ValueError(f"no plan for concern {concern!r} (plans: {', '.join(planners)})")
    return planners[concern]


# Refusals and GRUB (GPU nodes) -----------------------------------------------------------

def host_refusal(p: NodeProfile, data: dict[str, Any]) -> str | None:
    """Why gpunode must not touch this host at all (None: it may). Decided from the first
    snapshot, before anything changes."""
    found = data["os"]
    if (found["id"], found["version_id"]) != OS_IDS[p.os]:
        return (f"{p.name}: the profile says {p.os} but the host runs {found['id']} "
                f"{found['version_id']}; nothing was changed")
    missing = d.missing_kernel_args(p, data["cmdline"], Snapshot(data).thp_default)
    boot = data["boot"]
    if missing and "grub" not in boot:
        return (f"{p.name}: the kernel command line lacks {' '.join(missing)}, and gpunode "
                "sets kernel arguments through GRUB, which this host does not have (no "
                "update-grub or grub-mkconfig; found: "
                f"{', '.join(boot) or 'no boot loader gpunode knows'}); nothing was changed. "
                "Add them through the host's boot loader and reboot, or install GRUB")
    return None


def grub_key(data: dict[str, Any], grub_cfg_sha256: str) -> str | None:
    """The GRUB stamp's key: the drop-in's hash, or None (nothing to run) on a host without
    GRUB, which host_refusal let through only because its command line is complete."""
    return grub_cfg_sha256 if "grub" in data["boot"] else None


def thp_differs(p: NodeProfile, data: dict[str, Any]) -> bool:
    """THP's runtime mode differs from the profile (the tmpfiles file applies it now)."""
    thp = data["thp"]
    return (thp.get("enabled") not in (None, p.tuning.thp)
            or thp.get("defrag") not in (None, p.tuning.thp_defrag))


def governor_differs(p: NodeProfile, data: dict[str, Any]) -> bool:
    """Some CPU's governor differs from the profile (the governor unit runs again)."""
    govs = data["governors"]
    return bool(p.tuning.governor and govs and govs != [p.tuning.governor])


def governor_needed(p: NodeProfile, snap: Snapshot) -> bool:
    """The governor unit must run (again): a CPU's governor differs, or the unit is not
    active (a changed unit file triggers it too, in the engines)."""
    return bool(p.tuning.governor) and (
        governor_differs(p, snap.data) or not unit_state(snap, paths.CPU_GOVERNOR_UNIT)["active"])


def governor_skipped(p: NodeProfile, data: dict[str, Any]) -> str | None:
    """The notice when the profile sets a governor the host has no cpufreq for (a VM)."""
    if p.tuning.governor and not data["cpufreq"]:
        return (f"CPU governor {p.tuning.governor} skipped: no cpufreq on this host "
                f"({data['virt']})")
    return None


def secure_boot(p: NodeProfile, snap: Snapshot) -> str | None:
    """With Secure Boot on and DKMS about to build the module (cuda-repo, driver not yet
    installed): "stop" (the profile's secure_boot policy) or "notice"; None otherwise."""
    if (p.nvidia.source == "cuda-repo" and snap.data["secure_boot"]
            and not snap.driver_installed(p)):
        return "stop" if p.nvidia.secure_boot == "stop" else "notice"
    return None


def gpu_settings_needed(p: NodeProfile, snap: Snapshot) -> bool:
    """nvidia-smi answers and a GPU differs from the profile's settings, or the settings
    unit is not active (a changed settings file triggers it too, in the engines)."""
    return snap.smi_ok and (bool(d.gpu_settings_drift(p, snap.gpus))
                            or not unit_state(snap, paths.GPU_SETTINGS_UNIT)["active"])


# Package sets and apt lists (GPU nodes) -------------------------------------------------

APT_LISTS_MAX_AGE_S = 3600


def cdi_key(snap: Snapshot) -> str | None:
    """What the CDI spec describes, the driver version and the GPUs: the spec is made again
    when it changes (None, nothing to make, while nvidia-smi sees no GPU)."""
    gpus = snap.gpus
    return (gpus[0].driver_version + " " + ",".join(g.uuid for g in gpus)) if gpus else None


def cdi_spec_missing(p: NodeProfile, snap: Snapshot) -> bool:
    """The toolkit's refresh service left no spec (its boot run skipped or failed): start it
    whatever the stamp says."""
    return d.cdi_refresh(p) and not snap.file(paths.CDI_SPEC)


def etc_cdi_cleanup_needed(p: NodeProfile, snap: Snapshot) -> bool:
    """gpunode generated /etc/cdi/nvidia.yaml earlier (its `cdi` stamp says so) and the
    toolkit's refresh units now keep the spec in /var/run/cdi."""
    return d.cdi_refresh(p) and bool(snap.file(stamp_path("cdi")))


def stale_services(p: NodeProfile, snap: Snapshot) -> list[str]:
    """Services with a config on the host but no longer in the profile."""
    keep = {s.name for s in p.vllm.services}
    found = {paths.service_of_config(c) for c in snap.data["globs"].get(paths.VLLM_CONFIG_GLOB, [])}
    return sorted(found - keep)


def sysctl_differs(p: NodeProfile, data: dict[str, Any]) -> bool:
    """A kernel parameter's live value differs from the profile's (applied again)."""
    return any(data["sysctl"].get(k) != " ".join(v.split()) for k, v in d.sysctls(p).items())


def block_mismatches(p: NodeProfile, data: dict[str, Any]
                     ) -> list[tuple[str, str, Any, Any, list[str]]]:
    """Each setting of a disk gpunode tunes that differs from the profile, as (disk,
    "scheduler" or "read_ahead_kb", host's value, wanted value, schedulers the kernel
    offers for that disk). The deploy and the checks both judge from this list."""
    out = []
    for dev, got in sorted((data.get("block") or {}).items()):
        want = d.block_wanted(p, dev)
        if want is None:
            continue
        offered = got.get("schedulers", [])
        for setting, wanted in zip(("scheduler", "read_ahead_kb"), want, strict=True):
            if got.get(setting) != wanted:
                out.append((dev, setting, got.get(setting), wanted, offered))
    return out


def block_differs(p: NodeProfile, data: dict[str, Any]) -> list[str]:
    """Disks whose read-ahead, or whose I/O scheduler where the kernel offers the one wanted,
    differs from the profile (the rules are applied again). A scheduler the kernel does not
    offer for a disk is no step a deploy could take: the checks report it."""
    return sorted({dev for dev, setting, _, wanted, offered in block_mismatches(p, data)
                   if setting == "read_ahead_kb" or wanted in offered})


def daemon_reload_stale(p: NodeProfile, snap: Snapshot) -> bool:
    """systemd says one of the node's units changed on disk since it was loaded."""
    from gpunode.core.hostcmd import unit_names

    return any(snap.unit(u).get("NeedDaemonReload") == "yes" for u in unit_names(p))


def stale_driver(p: NodeProfile, snap: Snapshot) -> list[str]:
    """Installed packages of the profile's driver branch at another release than the pinned
    one (to move, up or down, to the pin); none when no release is pinned."""
    want = p.nvidia.version
    if not want:
        return []
    return sorted(n for n, v in snap.packages.items() if d.is_driver_package(n)
                  and v.split(":")[-1].startswith(f"{p.nvidia.branch}.")
                  and not v.split(":")[-1].startswith(f"{want}-"))


def unheld(snap: Snapshot, names: list[str]) -> list[str]:
    """The packages of `names` apt does not hold yet."""
    return sorted(n for n in names if n not in snap.holds)


def dpkg_unfinished(snap: Snapshot) -> bool:
    """dpkg was stopped mid-run (packages unpacked, not configured): finish it first."""
    return bool(snap.data.get("dpkg_unfinished"))


def cuda_keyring_needed(snap: Snapshot) -> bool:
    """cuda-keyring (the package and its keyring file) is not in place."""
    return "cuda-keyring" not in snap.packages or not snap.file(paths.CUDA_KEYRING)


def ctk_key_needed(snap: Snapshot) -> bool:
    """The container toolkit repository's key is not in place."""
    return not snap.file(paths.CTK_KEYRING)


def runtime_lacks_nvidia(snap: Snapshot, runtime: str) -> bool:
    """The container runtime's config does not name the NVIDIA runtime yet (the snapshot's
    grep of it failed, or did not run)."""
    info = snap.data["cmds"].get(f"grep:{paths.RUNTIME_CONFIG[runtime]}")
    return info is None or info["rc"] != 0


def vllm_user_missing(p: NodeProfile, snap: Snapshot) -> bool:
    return p.vllm.user not in snap.data["users"]


def venv_outdated(p: NodeProfile, snap: Snapshot) -> bool:
    """vLLM's venv is missing or not the profile's (vLLM version, Python, locked set)."""
    return not d.venv_current(p, snap.data["venvs"].get(f"{p.vllm.prefix}/venv", {}))


def todo(snap: Snapshot, specs: list[str]) -> list[str]:
    """The `name` or `name=version` specs the host does not have yet."""
    out = []
    for spec in specs:
        name, _, version = spec.partition("=")
        have = snap.packages.get(name)
        if have is None or (version and have != version):
            out.append(spec)
    return out


def header_packages(p: NodeProfile, snap: Snapshot) -> list[str]:
    """The kernel headers this host needs: for its running and its newest kernel."""
    return d.header_packages(p, snap.data["kernel"], snap.data["kernels"])


def packages_todo(p: NodeProfile, snap: Snapshot) -> dict[str, list[str]]:
    """Per package set, what is still to install on this host."""
    pin = d.pinning_package(p)
    sets = {
        "base": d.base_packages(p),
        "headers": header_packages(p, snap),
        "pin": [pin] if pin else [],
        "driver": d.driver_packages(p),
        "cuda": [x.spec for x in d.cuda_packages(p) + d.nccl_packages(p)
                 + d.cudnn_packages(p)],
        "container_toolkit": [x.spec for x in d.container_toolkit_packages(p)],
        "dcgm": [x.spec for x in d.dcgm_packages(p)],
        "vllm": d.vllm_build_packages(p),
    }
    return {k: todo(snap, v) for k, v in sets.items()}


def nccl_check(p: NodeProfile, snap: Snapshot) -> str | None:
    """The command that stops the host before the CUDA set's install when its repositories
    lack the pinned libnccl2 (hostcmd.nccl_available); None once that build is installed,
    so a converged host runs nothing."""
    lib = [x.spec for x in d.nccl_packages(p) if x.name == "libnccl2"]
    return nccl_available(p) if todo(snap, lib) else None


def dkms_refusal(p: NodeProfile, snap: Snapshot) -> str | None:
    """The stop message when the DKMS package about to be installed depends on a dkms that
    no version apt can install satisfies (newer nvidia-kernel(-open)-dkms builds, 570.148.08
    onward, need dkms >= 3.1.8 and bookworm ships 3.0.10: THIRD-PARTY CLAIM, NeuralDrive
    docs). None when the package is installed at its candidate already, or apt knows
    nothing yet (no lists: the install itself reports that)."""
    from gpunode.core.lock import unmet_requirement

    pkg = d.dkms_kernel_package(p)
    out = (snap.data.get("cmds", {}).get(DKMS_OFFER_KEY) or {}).get("out", "")
    if pkg is None or not out:
        return None
    offered: list[str] = []
    version = depends = ""
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == "dkms" and value not in offered:
            offered.append(value)
        elif key == "version" and not version:
            version = value.strip()
        elif key == "depends" and not depends:
            depends = value.strip()
    if not version or snap.packages.get(pkg) == version:
        return None
    installed = snap.packages.get("dkms")
    available = offered + ([installed] if installed and installed not in offered else [])
    need = unmet_requirement(depends, "dkms", available)
    return d.dkms_unmet(p, pkg, version, need, available) if need else None


def apt_refresh_needed(p: NodeProfile, snap: Snapshot, now: float) -> bool:
    """Lists older than an hour are refreshed only when something is still to install:
    a converged host's next run changes nothing however old its lists are, and a version
    bump a month later still installs from fresh lists."""
    age = now - snap.data["apt_lists_mtime"]
    return age > APT_LISTS_MAX_AGE_S and any(packages_todo(p, snap).values())
