"""What gpunode reads from a host, as one batched pyinfra fact.

Each pyinfra fact is a remote command, and every operation is evaluated twice in pyinfra 3
(prepare, then execute). So the deploy reads the whole host in ONE command
(`snapshot_remote.py`, stdlib python3 on the host) and caches it until one of gpunode's
operations changes something."""

from __future__ import annotations

import base64
import json
import shlex
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pyinfra.api import FactBase

from gpunode.core import desired, paths
from gpunode.core.topology import NVIDIA_SMI_QUERY, Gpu, attach_topology, parse_query_gpu, parse_topo
from gpunode.model import NodeProfile

_SCRIPT = (Path(__file__).with_name("snapshot_remote.py")).read_bytes()
_SCRIPT_B64 = base64.b64encode(_SCRIPT).decode()


def snapshot_command(spec: dict[str, Any]) -> str:
    """The one remote command: python3 running the snapshot script on `spec`."""
    loader = "import base64,sys;exec(base64.b64decode(sys.argv.pop(1)))"
    return (f"python3 -c {shlex.quote(loader)} {_SCRIPT_B64} "
            f"{shlex.quote(json.dumps(spec, sort_keys=True))}")


class NodeSnapshot(FactBase):
    """Everything the deploy reads from a host, as a dict (see snapshot_remote.py)."""

    def command(self, spec_json: str) -> str:  # type: ignore[override]
        return snapshot_command(json.loads(spec_json))

    def process(self, output: list[str]) -> dict[str, Any]:  # type: ignore[override]
        return json.loads("\n".join(output))


@dataclass
class Snapshot:
    """A host as read by the snapshot script, with the derived views the deploy needs."""

    data: dict[str, Any]

    @property
    def packages(self) -> dict[str, str]:
        return self.data["packages"]

    @property
    def holds(self) -> list[str]:
        return self.data["holds"]

    def file(self, path: str) -> dict[str, Any] | None:
        return self.data["files"].get(path)

    def wrote(self, entries: dict[str, dict[str, Any]]) -> None:
        """Files or directories the deploy just wrote, as the snapshot would now read them."""
        self.data["files"].update(entries)

    def wanted(self, target: str, unit: str) -> bool:
        """`unit` is linked into `target`'s .wants (enabled without an [Install])."""
        from gpunode.core import paths

        return paths.wants_link(target, unit) in self.data["globs"].get(
            paths.wants_glob(target), [])

    def unit(self, name: str) -> dict[str, str]:
        return self.data["units"].get(name, {})

    @property
    def thp_default(self) -> str | None:
        """The running kernel's built-in THP mode (None: unknown, as in older snapshots)."""
        return self.data.get("thp_default")

    @property
    def kernel_modules(self) -> dict[str, dict[str, Any]]:
        """Per installed kernel: headers (bool) and the nvidia module's path (None: none);
        empty in snapshots older than the field."""
        return self.data.get("kernel_modules") or {}

    @property
    def smi_ok(self) -> bool:
        smi = self.data["nvidia_smi"]
        return bool(smi.get("present")) and smi.get("rc") == 0

    @cached_property
    def gpus(self) -> list[Gpu]:
        if not self.smi_ok:
            return []
        smi = self.data["nvidia_smi"]
        gpus = parse_query_gpu(smi["query"])
        if smi.get("topo"):
            attach_topology(gpus, parse_topo(smi["topo"]))
        return gpus

    def driver_installed(self, p: NodeProfile) -> bool:
        return all(name in self.packages for name in desired.driver_packages(p))


def node_spec(p: NodeProfile) -> dict[str, Any]:
    """What a deploy reads from the node: the one snapshot spec both engines and the
    checks use, by the node's kind."""
    from gpunode.core import hostcmd
    from gpunode.core.manifest import GPU_IDS_COMMAND, GPU_IDS_KEY

    spec = {
        "paths": sorted(set(managed_paths(p))),
        "units": [] if p.kind == "pve-host" else hostcmd.unit_names(p),
        "sysctls": sorted(desired.sysctls(p)),
        "nvidia_smi_query": NVIDIA_SMI_QUERY,
        "venvs": [f"{p.vllm.prefix}/venv"],
    }
    if p.kind == "pve-host":
        spec.update(pci=True, reads=[paths.KERNEL_CMDLINE])
        return spec
    spec["globs"] = [paths.VLLM_CONFIG_GLOB, paths.wants_glob("multi-user.target")]
    spec["block"] = p.tuning.block_io.enabled
    spec["commands"] = {f"grep:{paths.RUNTIME_CONFIG[r]}": desired.runtime_probe(
        paths.RUNTIME_CONFIG[r]) for r in p.container_toolkit.runtimes if r != "podman"}
    spec["commands"][GPU_IDS_KEY] = GPU_IDS_COMMAND  # for the manifest
    dkms = hostcmd.dkms_offer_command(p)
    if dkms:  # debian-12 from the CUDA repo: plan.dkms_refusal reads it
        spec["commands"][hostcmd.DKMS_OFFER_KEY] = dkms
    return spec


def managed_paths(p: NodeProfile) -> list[str]:
    """Every host path the snapshot reports on: managed files (the placement drop-ins
    whatever the GPUs), credentials, keyrings, runtime configs, directories, stamps and
    the manifest; a PVE host's own files and stamps."""
    from gpunode.core import pve_host
    from gpunode.core.files import credentials, node_files

    if p.kind == "pve-host":
        return [paths.PVE_VFIO_CONF, paths.PVE_BLACKLIST_CONF, paths.PVE_MODULES_CONF,
                paths.PVE_GRUB_CFG, paths.KERNEL_CMDLINE, paths.stamp_path(pve_host.BOOT_STAMP),
                paths.stamp_path(pve_host.INITRAMFS_STAMP), paths.STAMPS]
    out = [f.path for f in node_files(p)]
    out += [paths.vllm_unit_dropin(s.name) for s in p.vllm.services]
    out += [c.path for c in credentials(p)]
    out += [paths.IRQ_DROPIN, paths.CUDA_KEYRING, paths.CTK_KEYRING, paths.ETC_CDI_SPEC,
            paths.CDI_SPEC, *paths.RUNTIME_CONFIG.values()]
    out += [paths.VLLM_ETC, paths.VLLM_CREDENTIALS, paths.VLLM_HOME, p.vllm.model_cache]
    out += [paths.stamp_path(name) for name in ("initramfs", "grub", "cdi", "cdi-refresh",
                                                "vllm-venv")]
    out.append(paths.MANIFEST_PATH)
    return out


def reboot_reasons(p: NodeProfile, snap: Snapshot) -> list[str]:
    """Why this host needs a reboot now (empty: it does not)."""
    reasons = []
    data = snap.data
    installed = snap.driver_installed(p)
    if installed and "nouveau" in data["modules"]:
        reasons.append("nouveau is loaded; the NVIDIA driver can load only after a reboot")
    smi = data["nvidia_smi"]
    if installed and smi.get("present") and smi.get("rc") not in (0, None):
        if "mismatch" in (smi.get("error") or "").lower():
            reasons.append("NVIDIA driver/library version mismatch (driver upgraded, old "
                           "kernel module still loaded)")
        elif data.get("nvidia_proc_version") is None:
            reasons.append("the NVIDIA kernel module is not loaded")
    if data["reboot_required"]:
        pkgs = ", ".join(data["reboot_required_pkgs"]) or "packages"
        reasons.append(f"/run/reboot-required is set (by {pkgs})")
    missing = desired.missing_kernel_args(p, data["cmdline"], snap.thp_default)
    if missing and data["files"].get(paths.GRUB_CFG):
        reasons.append(f"kernel command line lacks {' '.join(missing)} (set in GRUB, "
                       "applies at the next boot)")
    for gpu in snap.gpus:
        cur, pend = gpu.values.get("ecc.mode.current"), gpu.values.get("ecc.mode.pending")
        if cur and pend and cur != pend and "N/A" not in (cur, pend):
            reasons.append(f"GPU {gpu.index}: ECC change pending ({cur} -> {pend})")
    return reasons
