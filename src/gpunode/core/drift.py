"""`gpunode drift`: a node's live state against its lock, the files gpunode writes, and its
siblings (nodes sharing a site group). Pure: `compare` takes what `gpunode.core.manifest.read_live`
read from each host (the deploys' one-command snapshot and the manifest built from it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from gpunode.core.files import node_files
from gpunode.core.lock import GROUPS, locked_packages, normalize
from gpunode.core.manifest import MANIFEST_PATH, managed_package
from gpunode.model import NodeProfile

#: Manifest fields compared between siblings (host-specific ones, UUIDs and file hashes of
#: GPU-placement files, are not).
SIBLING_FIELDS = ("kernel", "driver_module", "packages", "vllm", "models")


@dataclass
class Finding:
    node: str
    kind: str  # lock | file | sibling:<name> | host
    item: str
    expected: str
    live: str


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def against_lock(name: str, entry: dict[str, Any], manifest: dict[str, Any]) -> list[Finding]:
    out = []
    live = manifest.get("packages", {})
    # The manifest records gpunode's managed packages only (manifest.managed_package): a
    # locked dependency outside them (the simulation's base package, say) is not judged.
    want = {n: v for n, v in locked_packages(entry).items() if managed_package(n)}
    for pkg, version in sorted(want.items()):
        if live.get(pkg) != version:
            out.append(Finding(name, "lock", pkg, version, live.get(pkg) or "not installed"))
    locked_names = set(want)
    for pkg, version in sorted(live.items()):
        if pkg not in locked_names and pkg != "cuda-keyring" and locked_names:
            out.append(Finding(name, "lock", pkg, "not locked", version))
    driver = (entry.get("nvidia") or {}).get("driver")
    module = manifest.get("driver_module")
    if driver and module and module != driver:
        out.append(Finding(name, "lock", "driver module loaded", driver, module))
    py = entry.get("vllm") or {}
    venv = (manifest.get("vllm") or {}).get("packages") or {}
    if py.get("packages"):
        locked_py = {normalize(n): v["version"] for n, v in py["packages"].items()}
        have = {normalize(n): v for n, v in venv.items()}
        for pkg in sorted(set(locked_py) | set(have)):
            if locked_py.get(pkg) != have.get(pkg):
                out.append(Finding(name, "lock", f"python {pkg}", locked_py.get(pkg) or
                                   "not locked", have.get(pkg) or "not installed"))
    models = (entry.get("models") or {}).get("services") or {}
    for svc, m in sorted(models.items()):
        live_m = (manifest.get("models") or {}).get(svc)
        if live_m != m:
            out.append(Finding(name, "lock", f"model {svc}", f"{m['model']}@{m['revision']}",
                               str(live_m)))
    return out


def against_files(p: NodeProfile, snapshot: dict[str, Any], written: dict[str, Any] | None
                  ) -> list[Finding]:
    """Managed files whose content is not gpunode's rendering (or, for files that depend on
    host facts, not what the last deploy recorded in the manifest)."""
    from gpunode.facts import Snapshot

    snap = Snapshot(snapshot)
    expected = {f.path: _sha(f.content) for f in node_files(p, snap.gpus or None,
                                                           snap.thp_default)}
    for path, digest in ((written or {}).get("files") or {}).items():
        expected.setdefault(path, digest)
    out = []
    files = snapshot.get("files", {})
    for path, digest in sorted(expected.items()):
        if path == MANIFEST_PATH:
            continue
        have = (files.get(path) or {}).get("sha256")
        if path not in files:
            continue  # not read by this snapshot
        if have != digest:
            out.append(Finding(p.name, "file", path, f"sha256 {digest[:12]}",
                               f"sha256 {have[:12]}" if have else "missing"))
    return out


def _flat(manifest: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key in SIBLING_FIELDS:
        value = manifest.get(key)
        if key == "packages":
            out.update({f"package {n}": v for n, v in (value or {}).items()})
        elif key == "vllm":
            out["vllm"] = str((value or {}).get("version"))
            out["vllm dependencies"] = str((value or {}).get("dependency_hash"))[:12]
        elif key == "models":
            out.update({f"model {n}": f"{m['model']}@{m['revision']}"
                        for n, m in (value or {}).items()})
        else:
            out[key] = str(value)
    return out


def against_siblings(p: NodeProfile, groups: dict[str, list[str]],
                     live: dict[str, dict[str, Any]]) -> list[Finding]:
    out = []
    mine = _flat(live[p.name]["manifest"])
    seen = set()
    for g in p.groups:
        for other in groups.get(g, []):
            if other == p.name or other in seen or other not in live:
                continue
            seen.add(other)
            theirs = _flat(live[other]["manifest"])
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    out.append(Finding(p.name, f"sibling:{other}", key,
                                       theirs.get(key) or "absent", mine.get(key) or "absent"))
    return out


def compare(site: Any, names: list[str], live: dict[str, dict[str, Any]],
            lock_doc: dict[str, Any] | None) -> list[Finding]:
    """Every finding for the nodes `names` (live: gpunode.core.manifest.read_live per node)."""
    out: list[Finding] = []
    for name in names:
        if name not in live:
            continue
        p = site.nodes[name]
        host = live[name]
        if lock_doc is not None:
            out += against_lock(name, lock_doc["nodes"].get(name) or {}, host["manifest"])
        out += against_files(p, host["snapshot"], host.get("written"))
        out += against_siblings(p, site.groups, live)
    return out


__all__ = ["GROUPS", "Finding", "compare"]
