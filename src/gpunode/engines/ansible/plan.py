"""What the Ansible roles need from gpunode, computed on the controller.

The roles decide nothing themselves: `gpunode_desired` (an action plugin) returns
`desired(profile)` -- the files to write and from which template, packages, holds,
commands -- and `gpunode_snapshot` reads the host with the SAME batched snapshot script as
the pyinfra deploy and returns `observed(profile, data)`: the host-dependent decisions the
pyinfra operations make (what to install, hold, restart, stamp; reboot reasons; GPU
placement). Both are plain JSON data, so the roles stay thin YAML over standard modules."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath
from typing import Any

from gpunode.core import desired as d
from gpunode.core import paths, plan
from gpunode.core.files import (
    ManagedFile,
    banned_cpus,
    credentials,
    node_files,
    placements,
    restart_inputs,
)
from gpunode.core.hostcmd import (
    APT_ENV_VARS,
    BLOCK_APPLY,
    OS_IDS,
    STAMP_COMMANDS,
    SYSCTL_APPLY,
    TMPFILES_APPLY,
    apt_get,
    apt_mark,
    ctk_key_install,
    dpkg_configure_pending,
    driver_to_version,
    etc_cdi_cleanup,
    keyring_install,
    remove_service,
    runtime_configure,
    stamped_command,
    unit_names,
    user_command,
    venv_command,
)
from gpunode.core.manifest import manifest_file, write_command
from gpunode.core.paths import stamp_path
from gpunode.core.plan import reboot_message, sha256
from gpunode.core.render import MANAGED_HEADER, TEMPLATES
from gpunode.core.topology import Gpu
from gpunode.facts import Snapshot, reboot_reasons
from gpunode.model import NodeProfile

CONCERNS = ("base", "tuning", "nvidia_driver", "gpu_settings", "container_toolkit", "vllm")


def _scope(p: NodeProfile, f: ManagedFile, gpus: list[Gpu] | None,
           thp_default: str | None) -> dict[str, Any]:
    """The per-instance template variables of one managed file (besides node and header)."""
    if f.template == "tuning/irqbalance.conf.j2":
        return {"banned_cpus": banned_cpus(p, gpus or [])}
    if f.template == "tuning/60-gpunode-grub.cfg.j2":
        return {"kernel_args": " ".join(d.kernel_args(p, thp_default))}
    if f.scope != "service":
        return {}
    data = p.model_dump(mode="json")["vllm"]["services"]
    name = f.service
    scope: dict[str, Any] = {"service": next(s for s in data if s["name"] == name)}
    if f.template == "vllm/instance.conf.j2":
        scope["placement_lines"] = placements(p, gpus or [])[name].unit_lines()
    return scope


def file_jobs(p: NodeProfile, gpus: list[Gpu] | None = None,
              thp_default: str | None = None) -> list[dict[str, Any]]:
    """gpunode.core.files.node_files as template jobs: path, template, mode, owner, group,
    concern, scope (the per-instance variables), sha256 of gpunode's rendering."""
    jobs = []
    for f in node_files(p, gpus, thp_default):
        scope = _scope(p, f, gpus, thp_default)
        jobs.append({"concern": f.concern, "path": f.path, "template": f.template,
                     "mode": f"{f.mode:04o}", "owner": f.owner, "group": f.group,
                     "parent": str(PurePosixPath(f.path).parent),
                     "apt_source": f.apt_source, "systemd_unit": f.systemd_unit,
                     "restart": list(f.restart),
                     "scope": scope, "sha256": sha256(f.content)})
    return jobs


def desired(p: NodeProfile, gpus: list[Gpu] | None = None,
            thp_default: str | None = None) -> dict[str, Any]:
    """Host-independent values for the roles (`gpunode_desired` facts); `observed` calls it
    again with the host's facts for the files that depend on them."""
    files: dict[str, list[dict[str, Any]]] = {c: [] for c in CONCERNS}
    for job in file_jobs(p, gpus, thp_default):
        files[job["concern"]].append(job)
    cuda = d.cuda_packages(p) + d.nccl_packages(p) + d.cudnn_packages(p)
    ctk = d.container_toolkit_packages(p)
    dcgm = d.dcgm_packages(p)
    url, sha = d.keyring_url(p), d.keyring_sha256(p)
    return {
        "managed_header": MANAGED_HEADER,
        "templates_dir": str(TEMPLATES),
        "files": files,
        "irqbalance": ("stop" if p.tuning.irqbalance == "disabled" else
                       "ban" if p.tuning.irqbalance == "ban-service-cpus" and p.vllm.services
                       else "leave"),
        "dkms": p.nvidia.source == "cuda-repo",
        "keyring_command": keyring_install(p),
        "secure_boot_stop": d.secure_boot_stop(p),
        "secure_boot_notice": d.secure_boot_notice(p),
        "no_keyring_checksum": d.no_keyring_checksum(p),
        "os": dict(zip(("id", "version_id"), OS_IDS[p.os], strict=True)),
        "apt_env": APT_ENV_VARS,
        "dpkg_configure_pending": dpkg_configure_pending(p),
        # apt-get itself, not the apt module: the module installs its own python3-apt
        # WITH recommends when missing (iso-codes, ...), which pyinfra's host never gets.
        "apt_update": apt_get(p, "update"),
        "python_apt_install": apt_get(p, "install python3-apt"),
        "packages": {
            "base": d.base_packages(p),
            "pin": d.pinning_package(p),
            "driver": d.driver_packages(p),
            "cuda": [x.spec for x in cuda],
            "container_toolkit": [x.spec for x in ctk],
            "dcgm": [x.spec for x in dcgm],
        },
        "holds": {
            "cuda": [x.name for x in cuda if x.version] if p.nvidia.hold else [],
            "container_toolkit": [x.name for x in ctk] if p.nvidia.hold else [],
            "dcgm": [x.name for x in dcgm if x.version] if p.nvidia.hold else [],
        },
        "keyring": {"url": url, "sha256": sha, "path": paths.CUDA_KEYRING},
        "ctk_key_command": ctk_key_install(p),
        "runtimes": [{"name": r, "config": paths.RUNTIME_CONFIG[r], "command": runtime_configure(r)}
                     for r in p.container_toolkit.runtimes if r != "podman"],
        "cdi_refresh_units": d.cdi_refresh_units(p),
        "irq_dropin": paths.IRQ_DROPIN,
        "sysctl_command": SYSCTL_APPLY,
        "tmpfiles_command": TMPFILES_APPLY,
        "block_command": BLOCK_APPLY,
        "cpu_governor": ({"unit": paths.CPU_GOVERNOR_UNIT, "path": paths.CPU_GOVERNOR_UNIT_PATH}
                         if p.tuning.governor else None),
        "vllm": {
            "venv": f"{p.vllm.prefix}/venv",
            "venv_command": venv_command(p),
            "user_command": user_command(p),
            "units": [{"name": s.name, "unit": d.vllm_unit(s.name),
                       "dropin": paths.vllm_unit_dropin(s.name),
                       "inputs": restart_inputs(p, s.name)}
                      for s in p.vllm.services],
            # paths only: the role reads each source on the controller (no_log)
            "credentials": [{"path": c.path, "source": str(Path(c.source).expanduser().resolve())}
                            for c in credentials(p)],
            "directories": [
                {"path": paths.VLLM_HOME, "mode": "0755", "owner": p.vllm.user,
                 "group": p.vllm.user},
                {"path": p.vllm.model_cache, "mode": "0755", "owner": p.vllm.user,
                 "group": p.vllm.user},
                {"path": paths.VLLM_ETC, "mode": "0750", "owner": "root",
                 "group": p.vllm.user},
                {"path": paths.VLLM_CREDENTIALS, "mode": "0700", "owner": "root",
                 "group": "root"},
            ],
        },
    }


def _file_ok(snap: Snapshot, path: str, digest: str, mode: str, owner: str,
             group: str) -> bool:
    return not plan.file_differs(snap, path, digest, mode, owner, group)


def observed(p: NodeProfile, data: dict[str, Any], skip_unchanged: bool = True
             ) -> dict[str, Any]:
    """Host-dependent decisions (`gpunode` facts), the same ones the pyinfra operations make
    from the same snapshot. skip_unchanged=False reports no file as already right, so every
    template task runs (and compares on the host)."""
    snap = Snapshot(data)
    want = desired(p, thp_default=snap.thp_default)
    gpus = snap.gpus
    files_ok = {job["path"]: _file_ok(snap, job["path"], job["sha256"], job["mode"],
                                      job["owner"], job["group"])
                for jobs in want["files"].values() for job in jobs}
    placement_files: dict[str, list[dict[str, Any]]] = {"tuning": [], "vllm": []}
    if gpus:
        for job in file_jobs(p, gpus, snap.thp_default):
            if job["path"] == paths.IRQ_DROPIN or job["template"] == "vllm/instance.conf.j2":
                if job["path"] == paths.IRQ_DROPIN and not job["scope"]["banned_cpus"]:
                    continue
                placement_files[job["concern"]].append(job)
                files_ok[job["path"]] = _file_ok(snap, job["path"], job["sha256"], job["mode"],
                                                 job["owner"], job["group"])
    for cred in want["vllm"]["credentials"]:
        key = _read_key(cred["source"])
        files_ok[cred["path"]] = key is not None and _file_ok(
            snap, cred["path"], sha256(key), "0600", "root", "root")
    if not skip_unchanged:
        files_ok = dict.fromkeys(files_ok, False)
    parents: dict[str, list[str]] = {c: [] for c in CONCERNS}
    every = [j for jobs in [*want["files"].values(), *placement_files.values()] for j in jobs]
    for job in every:
        if not files_ok[job["path"]] and job["parent"] not in parents[job["concern"]]:
            parents[job["concern"]].append(job["parent"])
    stamps = {}
    grub = next(j for j in want["files"]["tuning"] if j["path"] == paths.GRUB_CFG)
    blacklist = next(j for j in want["files"]["nvidia_driver"]
                     if j["path"] == paths.NOUVEAU_BLACKLIST)
    cdi_key = plan.cdi_key(snap)
    for name, key, force in (("grub", plan.grub_key(data, grub["sha256"]), False),
                             ("initramfs", blacklist["sha256"], False),
                             ("cdi", cdi_key, False),
                             ("cdi-refresh", cdi_key, plan.cdi_spec_missing(p, snap))):
        stamp = stamp_path(name)
        needed = key is not None and (force or not _file_ok(
            snap, stamp, sha256(key + "\n"), "0644", "root", "root"))
        stamps[name] = {"path": stamp, "needed": needed, "command":
                        stamped_command(STAMP_COMMANDS[name], name, key) if key else None}
    stale_driver = plan.stale_driver(p, snap)
    units = {u: plan.unit_state(snap, u) for u in unit_names(p)}
    units[paths.PERSISTENCED_UNIT]["wanted"] = snap.wanted("multi-user.target",
                                                            paths.PERSISTENCED_UNIT)
    missing_holds = {
        "driver": (plan.unheld(snap, d.driver_hold_set(p, snap.packages)) if p.nvidia.hold
                   else []),
        **{k: plan.unheld(snap, v) for k, v in want["holds"].items()},
    }
    return {
        "refusal": plan.host_refusal(p, data),
        "smi_ok": snap.smi_ok,
        "secure_boot": plan.secure_boot(p, snap),
        "governor_skipped": plan.governor_skipped(p, data),
        "governor_needed": plan.governor_needed(p, snap),
        "gpu_settings_needed": plan.gpu_settings_needed(p, snap),
        "files_ok": files_ok,
        # the GRUB drop-in depends on the kernel's built-in THP mode: the role writes these
        "tuning_files": want["files"]["tuning"],
        "placement_files": placement_files,
        "parents_needed": parents,
        "todo": plan.packages_todo(p, snap),
        "apt_refresh": plan.apt_refresh_needed(p, snap, time.time()),
        "nccl_check": plan.nccl_check(p, snap),
        "dkms_refusal": plan.dkms_refusal(p, snap),
        "held": sorted(snap.holds),
        "missing_holds": missing_holds,
        "hold_command": {k: apt_mark(p, "hold", v) if v else None
                         for k, v in missing_holds.items()},
        "stale_driver": stale_driver,
        "driver_to_version": driver_to_version(p, stale_driver) if stale_driver else None,
        "dpkg_unfinished": plan.dpkg_unfinished(snap),
        "keyring_needed": plan.cuda_keyring_needed(snap),
        "ctk_key_needed": plan.ctk_key_needed(snap),
        "sysctl_differs": plan.sysctl_differs(p, data),
        "thp_differs": plan.thp_differs(p, data),
        "block_differs": plan.block_differs(p, data),
        "stamps": stamps,
        "units": units,
        "stale_daemon": plan.daemon_reload_stale(p, snap),
        "etc_cdi_cleanup": etc_cdi_cleanup() if plan.etc_cdi_cleanup_needed(p, snap) else None,
        "runtime_lacks": {r: plan.runtime_lacks_nvidia(snap, r)
                          for r in p.container_toolkit.runtimes if r != "podman"},
        "user_missing": plan.vllm_user_missing(p, snap),
        "venv_ok": not plan.venv_outdated(p, snap),
        "stale_services": [{"name": n, "command": "({}) && {}".format(*remove_service(n))}
                           for n in plan.stale_services(p, snap)],
        "directories_ok": {x["path"]: _dir_ok(snap, x) for x in want["vllm"]["directories"]},
        "reboot_reasons": reboot_reasons(p, snap),
        "reboot_message": reboot_message(p, reboot_reasons(p, snap)),
        "reboot_refusal": plan.reboot_refusal(p, snap, reboot_reasons(p, snap)),
        "manifest": _manifest_job(p, snap),
    }


def _manifest_job(p: NodeProfile, snap: Snapshot) -> dict[str, Any]:
    """The node manifest (gpunode.core.manifest) from this snapshot, and whether the host has it."""
    f = manifest_file(p, snap.data)
    return {"path": f.path, "content": f.content, "mode": f"{f.mode:04o}",
            "command": write_command(f),
            "ok": _file_ok(snap, f.path, sha256(f.content), f"{f.mode:04o}", f.owner, f.group)}


def _read_key(path: str) -> str | None:
    from gpunode.engines.pyinfra.vllm import read_key

    return read_key(path)


def _dir_ok(snap: Snapshot, x: dict[str, str]) -> bool:
    return not plan.dir_differs(snap, x["path"], x["mode"], x["owner"], x["group"])
