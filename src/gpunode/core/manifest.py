"""The node manifest: what a deploy left on a node, written there by both engines as
/var/lib/gpunode/manifest.json and read back by `gpunode manifest` and `gpunode drift`.

`build` is a pure function of the profile and the deploy's one-command host snapshot
(gpunode.facts): versions of every NVIDIA-side package installed, the kernel, the loaded
driver module, GPU UUIDs and VBIOS, vLLM and the hash of its installed dependency set, the
model revisions served and the sha256 of every managed file and unit. No timestamps: the same
host state gives the same bytes, so a no-op deploy writes nothing."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

from gpunode.core import desired, paths
from gpunode.core.files import ManagedFile
from gpunode.model import NodeProfile

MANIFEST_PATH = paths.MANIFEST_PATH
FORMAT = 1
#: The snapshot command key (spec["commands"]) that reads GPU UUIDs and VBIOS versions.
GPU_IDS_KEY = "gpu_ids"
GPU_IDS_COMMAND = "nvidia-smi --query-gpu=uuid,vbios_version --format=csv,noheader"
#: Installed packages the manifest records: gpunode's NVIDIA-side names (the same prefixes
#: it keeps out of unattended-upgrades) and the pinning/keyring packages.
PACKAGE_PREFIXES = (*desired.UNATTENDED_BLACKLIST, "cuda-keyring")


class HostError(Exception):
    """A host could not be read."""


def managed_package(name: str) -> bool:
    return name.startswith(PACKAGE_PREFIXES)


def driver_module_version(proc_version: str | None) -> str | None:
    """The loaded module's version from /proc/driver/nvidia/version."""
    if not proc_version:
        return None
    m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", proc_version)
    return m.group(1) if m else None


def parse_gpu_ids(text: str) -> list[dict[str, str]]:
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 2 and cells[0].startswith("GPU-"):
            out.append({"uuid": cells[0], "vbios": cells[1]})
    return out


def file_paths(p: NodeProfile) -> list[str]:
    """Managed files whose sha256 the manifest records (secrets and itself excluded)."""
    from gpunode.facts import managed_paths

    secrets = {paths.credential_path(s.name) for s in p.vllm.services} | {paths.HF_TOKEN_PATH}
    return sorted({x for x in managed_paths(p) if x not in secrets and x != MANIFEST_PATH})


def build(p: NodeProfile, data: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a node from its snapshot data."""
    from gpunode.core.lock import dependency_hash

    venv = data.get("venvs", {}).get(f"{p.vllm.prefix}/venv", {})
    ids = (data.get("cmds", {}).get(GPU_IDS_KEY) or {})
    files = data.get("files", {})
    return {
        "format": FORMAT,
        "node": p.name,
        "os": data.get("os"),
        "kernel": data.get("kernel"),
        "driver_module": driver_module_version(data.get("nvidia_proc_version")),
        "gpus": parse_gpu_ids(ids.get("out", "")) if ids.get("rc") == 0 else [],
        "packages": {n: v for n, v in sorted(data.get("packages", {}).items())
                     if managed_package(n)},
        "holds": sorted(n for n in data.get("holds", []) if managed_package(n)),
        "vllm": ({"version": venv.get("vllm"), "dependency_hash": dependency_hash(venv),
                  "packages": dict(sorted(venv.items()))} if p.vllm.services else None),
        "models": {s.name: {"model": s.model, "revision": s.revision}
                   for s in p.vllm.services},
        "files": {path: (files.get(path) or {}).get("sha256") for path in file_paths(p)
                  if (files.get(path) or {}).get("sha256")},
    }


def reproducible(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest a rebuild from the same site and lock must reproduce: all of it
    but what belongs to the machine (GPU UUIDs; their VBIOS versions stay)."""
    out = dict(manifest)
    out["gpus"] = [{k: v for k, v in g.items() if k != "uuid"} for g in manifest.get("gpus", [])]
    return out


def render(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def manifest_file(p: NodeProfile, data: dict[str, Any]) -> ManagedFile:
    """The manifest as a managed file (both engines write it with their file steps)."""
    return ManagedFile("manifest", MANIFEST_PATH, "", render(build(p, data)), 0o644)


def write_command(f: ManagedFile) -> str:
    """A shell command writing `f` exactly (base64 on the command line: the Ansible role
    uses it because Ansible 2.18 turns a templated string that looks like JSON into a dict,
    which `copy: content=` would write re-serialised)."""
    import base64

    data = base64.b64encode(f.content.encode()).decode()
    tmp = shlex.quote(f"{f.path}.gpunode-tmp")
    return (f"install -d -m 755 {shlex.quote(str(Path(f.path).parent))} && "
            f"printf %s {data} | base64 -d > {tmp} && chown {f.owner}:{f.group} {tmp} && "
            f"chmod {f.mode:o} {tmp} && mv -f {tmp} {shlex.quote(f.path)}")


def summary(doc: dict[str, Any]) -> list[str]:
    """Human lines for `gpunode manifest NODE`."""
    lines = [f"node {doc.get('node')}: kernel {doc.get('kernel')}, driver module "
             f"{doc.get('driver_module') or '-'}"]
    for g in doc.get("gpus", []):
        lines.append(f"  GPU {g['uuid']}  VBIOS {g['vbios']}")
    v = doc.get("vllm")
    if v:
        lines.append(f"  vLLM {v.get('version')}  dependencies sha256:{v.get('dependency_hash')}")
    for name, m in (doc.get("models") or {}).items():
        lines.append(f"  model {name}: {m['model']} @ {m['revision'] or '-'}")
    lines.append(f"  packages ({len(doc.get('packages', {}))}):")
    lines += [f"    {n} {ver}" for n, ver in doc.get("packages", {}).items()]
    lines.append(f"  files ({len(doc.get('files', {}))}):")
    lines += [f"    {digest[:16]}  {path}" for path, digest in doc.get("files", {}).items()]
    return lines


# --- reading a host (controller side) ----------------------------------------------------

def ssh_argv(p: NodeProfile, command: str) -> list[str]:
    c = p.connection
    argv = ["ssh", "-p", str(c.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=20"]
    if c.key:
        argv += ["-i", str(Path(c.key).expanduser())]
    if c.become and c.user != "root":
        command = f"sudo -n sh -c {shlex.quote(command)}"
    return [*argv, f"{c.user}@{c.address}", command]


def run_on(p: NodeProfile, command: str, timeout: float = 300) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(ssh_argv(p, command), capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 255, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def read_live(p: NodeProfile) -> dict[str, Any]:
    """The host's snapshot (the deploys' one command) and its manifest, as
    {"snapshot": data, "manifest": the manifest built from it, "written": the one on disk}."""
    from gpunode.facts import node_spec, snapshot_command

    rc, out, err = run_on(p, snapshot_command(node_spec(p)) + f"; echo; cat {MANIFEST_PATH} "
                          "2>/dev/null || true")
    if rc != 0 or not out.strip():
        raise HostError((err or out).strip()[-300:] or f"ssh exit {rc}")
    first, _, rest = out.partition("\n")
    try:
        data = json.loads(first)
    except ValueError as exc:
        raise HostError(f"snapshot is not JSON: {exc}") from None
    try:
        written = json.loads(rest) if rest.strip() else None
    except ValueError:
        written = None
    return {"snapshot": data, "manifest": build(p, data), "written": written}
