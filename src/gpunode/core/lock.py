"""Lock files: the exact versions a site leaves open, resolved once from the configured
repositories (apt `Packages` metadata, a PEP 503 simple index) and written beside the site
as `<site>.lock` (YAML, stable order), so a node rebuilt later gets what its siblings got.

Resolution is pure (`resolve_node` over `Sources`, which the CLI fills from the mirrors and
the tests from fixtures). The lock is split per node into *groups* (`nvidia`, `cuda`,
`nccl`, `cudnn`, `container-toolkit`, `dcgm`, `vllm`, `models`); each group records the site
values it was resolved from (`site:`), so `check_lock` can say which field disagrees and
`gpunode lock --update GROUP` re-resolves only that group."""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import yaml

from gpunode.core import desired
from gpunode.model import NodeProfile
from gpunode.model.profile import LockedGroup

FORMAT = 1
GROUPS = ("nvidia", "cuda", "nccl", "cudnn", "container-toolkit", "dcgm", "vllm", "models",
          "image")
HEADER = ("# gpunode lock: exact versions for this site, written by `gpunode lock`.\n"
          "# Review and commit it with the site. Deploys install these versions and refuse\n"
          "# to run when the site disagrees; `gpunode lock --update [GROUP|PACKAGE...]`\n"
          "# re-resolves (groups: " + ", ".join(GROUPS) + ").\n")


class LockError(Exception):
    """Resolution or lock-file problem: one line per problem in ``lines``."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def lock_path(site_path: Path) -> Path:
    """`<site>.lock` beside the site file (site.yaml -> site.lock)."""
    return site_path.with_suffix(".lock")


# --- Debian versions -----------------------------------------------------------------------

def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    """dpkg's verrevcmp over one upstream version or revision."""
    i = j = 0
    while i < len(a) or j < len(b):
        diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not diff:
                diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if diff:
            return -1 if diff < 0 else 1
    return 0


def _split(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
    return int(epoch or 0), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """Compare two Debian versions like `dpkg --compare-versions` (-1, 0, 1)."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


def _satisfies(version: str, op: str, want: str) -> bool:
    c = compare_versions(version, want)
    return {"=": c == 0, ">=": c >= 0, "<=": c <= 0, ">>": c > 0, "<<": c < 0,
            ">": c >= 0, "<": c <= 0}[op]


def unmet_requirement(depends: str, name: str, available: list[str]) -> str | None:
    """The `name (op version)` relation of a Depends field that none of the `available`
    versions satisfies (None: every relation on `name` is met, or there is none). A clause
    with alternatives other than `name` is left to apt."""
    for clause in filter(None, (c.strip() for c in depends.split(","))):
        alts = [a.strip() for a in clause.split("|")]
        if any(a.split("(")[0].split(":")[0].strip() != name for a in alts):
            continue
        if not any(_meets(alt, available) for alt in alts):
            return clause
    return None


def _meets(alt: str, available: list[str]) -> bool:
    _, _, rel = alt.partition("(")
    if not rel:
        return bool(available)
    op, _, want = rel.rstrip(")").strip().partition(" ")
    return any(_satisfies(v, op, want.strip()) for v in available)


# --- apt metadata ------------------------------------------------------------------------

@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    depends: str = ""
    sha256: str = ""
    mirror: str = ""  # the repository URL (as the site configures it) that lists it
    provides: str = ""  # virtual packages, as the Provides field lists them


def parse_packages(text: str, mirror: str = "") -> list[Deb]:
    """Stanzas of an apt `Packages` file (continuation lines folded)."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields and "Version" in fields:
            out.append(Deb(fields["Package"], fields["Version"],
                           fields.get("Pre-Depends", "") + ("," if fields.get("Pre-Depends")
                                                           else "") + fields.get("Depends", ""),
                           fields.get("SHA256", ""), mirror, fields.get("Provides", "")))
    return out


def _relations(depends: str) -> list[list[tuple[str, str | None, str | None]]]:
    """Depends as [[alternatives: (name, op, version)]]."""
    out = []
    for clause in depends.split(","):
        alts = []
        for alt in clause.split("|"):
            m = re.match(r"\s*([a-z0-9][a-z0-9+.-]*)(?::\w+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?",
                         alt)
            if m:
                alts.append((m.group(1), m.group(2), m.group(3)))
        if alts:
            out.append(alts)
    return out


class AptIndex:
    """Every package version the node's repositories list, newest first per name."""

    def __init__(self, debs: list[Deb]):
        self.by_name: dict[str, list[Deb]] = {}
        for deb in debs:
            self.by_name.setdefault(deb.name, []).append(deb)
        for versions in self.by_name.values():
            versions.sort(key=_Key, reverse=True)
        # virtual name -> the packages providing it (nvidia-kernel-support--v1, ...)
        self.providers: dict[str, list[Deb]] = {}
        for deb in debs:
            for alts in _relations(deb.provides):
                for name, _, _ in alts:
                    self.providers.setdefault(name, []).append(deb)
        for debs_ in self.providers.values():
            debs_.sort(key=_Key, reverse=True)

    def newest(self, name: str, accept: Callable[[Deb], bool] = lambda d: True) -> Deb | None:
        return next((d for d in self.by_name.get(name, []) if accept(d)), None)


class _Key:
    def __init__(self, deb: Deb):
        self.v = deb.version

    def __lt__(self, other: _Key) -> bool:
        return compare_versions(self.v, other.v) < 0


def upstream(version: str) -> str:
    return _split(version)[1]


def closure(index: AptIndex, roots: dict[str, Deb],
            prefer: Callable[[Deb], bool] = lambda d: True) -> dict[str, Deb]:
    """`roots` and their dependencies listed in the same repositories (others come from the
    OS archive and are not locked), newest version satisfying each relation, versions for
    which `prefer` holds first."""
    chosen = dict(roots)
    todo = list(roots.values())
    while todo:
        deb = todo.pop()
        for alts in _relations(deb.depends):
            for name, op, want in alts:
                if name not in index.by_name and name in index.providers:
                    # a virtual package: one of its providers, newest (preferred) first
                    providers = index.providers[name]
                    if not any(d.name in chosen for d in providers):
                        pick = next((d for d in providers if prefer(d)), providers[0])
                        chosen[pick.name] = pick
                        todo.append(pick)
                    break
                if name not in index.by_name:
                    continue
                if name in chosen:
                    break

                def ok(d: Deb, op: str | None = op, want: str | None = want) -> bool:
                    return op is None or want is None or _satisfies(d.version, op, want)

                pick = index.newest(name, lambda d: ok(d) and prefer(d)) or index.newest(name, ok)
                if pick is not None:
                    chosen[name] = pick
                    todo.append(pick)
                break
    return chosen


# --- Python index ------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    project: str
    version: str
    filename: str
    url: str
    sha256: str


normalize = desired.normalize_dist  # PEP 503 project name


_WHEEL = re.compile(r"^(?P<name>.+?)-(?P<ver>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)"
                    r"-(?P<plat>[^-]+)\.whl$")


def parse_simple_page(text: str, base_url: str) -> list[Dist]:
    """Wheels listed on a PEP 503 project page (anchors with #sha256=...)."""
    out = []
    for href, label in re.findall(r'<a\s+[^>]*href="([^"]+)"[^>]*>([^<]*)</a>', text):
        href = html.unescape(href)
        url, _, frag = href.partition("#")
        filename = html.unescape(label).strip() or url.rsplit("/", 1)[-1]
        m = _WHEEL.match(filename)
        if not m:
            continue
        digest = frag.split("=", 1)[1] if frag.startswith("sha256=") else ""
        from urllib.parse import urljoin

        out.append(Dist(normalize(m["name"]), m["ver"], filename, urljoin(base_url, url), digest))
    return out


def wheel_fits(filename: str, python: str) -> bool:
    """Does a wheel install on CPython `python` (e.g. "3.12"), Linux x86_64?"""
    m = _WHEEL.match(filename)
    if not m:
        return False
    cp = "cp" + python.replace(".", "")
    pys, abis, plats = m["py"].split("."), m["abi"].split("."), m["plat"].split(".")
    minor = int(python.split(".")[1])

    def abi3_ok(tag: str) -> bool:  # cp3X-abi3 installs on every CPython 3.Y, Y >= X
        return (tag.startswith("cp3") and tag[3:].isdigit() and int(tag[3:]) <= minor
                and "abi3" in abis)

    py_ok = any(t in ("py3", cp, "py" + python.replace(".", "")) or abi3_ok(t) for t in pys)
    abi_ok = any(a in ("none", "abi3", cp) for a in abis)
    plat_ok = any(p == "any" or (p.endswith("x86_64") and p.startswith(("manylinux", "linux",
                                                                         "musllinux_no")))
                  for p in plats)
    return py_ok and abi_ok and plat_ok


def marker_env(python: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": python + ".0",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "os_name": "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "platform_release": "",
            "platform_version": "", "implementation_version": python + ".0", "extra": ""}


@dataclass
class PyLock:
    packages: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> version, hashes

    def dependency_hash(self) -> str:
        return dependency_hash({n: v["version"] for n, v in self.packages.items()})


def dependency_hash(versions: dict[str, str]) -> str:
    """sha256 over the sorted `name==version` lines (names PEP 503-normalised): the same
    value from a lock and from an installed venv when they hold the same set."""
    lines = sorted(f"{normalize(n)}=={v}" for n, v in versions.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def resolve_python(roots: list[str], python: str, listing: Callable[[str], list[Dist]],
                   metadata: Callable[[Dist], list[str]]) -> PyLock:
    """Pin `roots` (requirement strings) and every dependency to the newest version the
    index offers as a wheel for `python` that satisfies the requirements met so far, with the
    sha256 of every fitting wheel of that version (like `uv pip compile --generate-hashes`).
    Greedy (first requirement seen decides); a later conflicting requirement is an error."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    env = marker_env(python)
    lock = PyLock()
    chosen: dict[str, str] = {}
    queue: list[tuple[str, str]] = [(r, "(root)") for r in roots]
    problems: list[str] = []
    while queue:
        text, wanted_by = queue.pop(0)
        req = Requirement(text)
        name = normalize(req.name)
        if name in chosen:
            if not req.specifier.contains(chosen[name], prereleases=True):
                problems.append(f"{name}: {wanted_by} needs {req.specifier}, but {chosen[name]} "
                                "was already chosen")
            continue
        dists = [d for d in listing(name) if wheel_fits(d.filename, python)]
        versions: dict[str, list[Dist]] = {}
        for d in dists:
            versions.setdefault(d.version, []).append(d)

        def key(v: str) -> Version:
            try:
                return Version(v)
            except InvalidVersion:
                return Version("0")

        fits = [v for v in sorted(versions, key=key, reverse=True)
                if req.specifier.contains(v, prereleases=bool(req.specifier) and
                                          any(s.version == v for s in req.specifier))
                or (not req.specifier and not key(v).is_prerelease)]
        if not fits:
            problems.append(f"{name}{req.specifier}: no wheel for CPython {python} "
                            f"(Linux x86_64) in the index (wanted by {wanted_by})")
            continue
        version = fits[0]
        chosen[name] = version
        files = sorted(versions[version], key=lambda d: d.filename)
        lock.packages[name] = {"version": version,
                               "hashes": [f"sha256:{d.sha256}" for d in files if d.sha256]}
        for dep in metadata(files[0]):
            dreq = Requirement(dep)
            extras = req.extras or {""}
            if dreq.marker is not None and not any(
                    dreq.marker.evaluate({**env, "extra": e}) for e in extras):
                continue
            queue.append((str(dreq).split(";")[0].strip(), f"{name}=={version}"))
    if problems:
        raise LockError(problems)
    lock.packages = dict(sorted(lock.packages.items()))
    return lock


def requires_dist(metadata_text: str) -> list[str]:
    """Requires-Dist lines of a wheel's METADATA."""
    return [line.split(":", 1)[1].strip() for line in metadata_text.splitlines()
            if line.startswith("Requires-Dist:")]


# --- per node ----------------------------------------------------------------------------

@dataclass
class Sources:
    """What resolution reads: apt stanzas per repository URL, and the Python index."""

    apt: dict[str, list[Deb]] = field(default_factory=dict)  # repo URL -> stanzas
    listing: Callable[[str, str], list[Dist]] = lambda index, name: []
    metadata: Callable[[Dist], list[str]] = lambda dist: []
    #: a pve-guest's image or template as the PVE API shows it (proxmox.state.image_identity)
    image: Callable[[NodeProfile], dict[str, Any] | None] = lambda p: None


def cuda_repo_url(p: NodeProfile) -> str:
    return f"{p.nvidia.repo_url.rstrip('/')}/{p.distro}/x86_64/"


def ctk_repo_url(p: NodeProfile) -> str:
    return f"{p.container_toolkit.repo_url.rstrip('/')}/amd64/"


def repo_urls(p: NodeProfile) -> list[str]:
    if p.kind == "pve-host":
        return []
    urls = [cuda_repo_url(p)] if p.nvidia.source == "cuda-repo" else []
    if p.container_toolkit.enabled:
        urls.append(ctk_repo_url(p))
    return urls


def group_inputs(p: NodeProfile, group: str) -> dict[str, Any] | None:
    """The site values a group is resolved from (field path -> value); None: the group is
    not part of this node (a Proxmox host installs none of them: its GPUs go to VMs)."""
    if p.kind == "pve-host":
        return None
    n = p.nvidia
    if group == "nvidia":
        return {"os": p.os, "nvidia.source": n.source, "nvidia.branch": n.branch,
                "nvidia.version": n.version, "nvidia.open_kernel_modules": n.open_kernel_modules,
                "nvidia.compute_only": n.compute_only, "nvidia.repo_url": n.repo_url}
    if group == "cuda":
        return ({"os": p.os, "cuda.version": p.cuda.version, "nvidia.repo_url": n.repo_url}
                if p.cuda.enabled else None)
    if group == "nccl":
        return ({"os": p.os, "nccl.version": p.nccl.version, "cuda.version": p.cuda.version,
                 "nvidia.repo_url": n.repo_url} if p.nccl.enabled else None)
    if group == "cudnn":
        return ({"os": p.os, "cudnn.version": p.cudnn.version, "cuda.version": p.cuda.version,
                 "nvidia.repo_url": n.repo_url} if p.cudnn.enabled else None)
    if group == "container-toolkit":
        c = p.container_toolkit
        return ({"container_toolkit.version": c.version, "container_toolkit.repo_url": c.repo_url}
                if c.enabled else None)
    if group == "dcgm":
        return ({"os": p.os, "dcgm.version": p.dcgm.version, "dcgm.exporter": p.dcgm.exporter,
                 "cuda.version": p.cuda.version, "nvidia.repo_url": n.repo_url}
                if p.dcgm.enabled else None)
    if group == "vllm":
        v = p.vllm
        return ({"vllm.version": v.version, "vllm.python": v.python, "vllm.index_url": v.index_url}
                if v.services else None)
    if group == "models":
        return ({f"vllm.services[{s.name}]": {"model": s.model, "revision": s.revision}
                 for s in p.vllm.services} if p.vllm.services else None)
    if group == "image":
        vm = p.vm
        return ({"vm.pve_node": vm.pve_node, "vm.cloud_image": vm.cloud_image,
                 "vm.template_vmid": vm.template_vmid}
                if p.kind == "pve-guest" and vm is not None else None)
    raise ValueError(group)


def _exact(index: AptIndex, pkgs: list[desired.Pkg], where: str) -> dict[str, Deb]:
    out = {}
    missing = []
    for pkg in pkgs:
        deb = index.newest(pkg.name, lambda d, v=pkg.version: v is None or d.version == v)
        if deb is None:
            missing.append(pkg.spec)
        else:
            out[pkg.name] = deb
    if missing:
        raise LockError([f"{where}: {', '.join(missing)} not in the configured repositories"])
    return out


def _apt_group(debs: dict[str, Deb]) -> dict[str, Any]:
    return {"packages": {name: {"version": d.version, "sha256": d.sha256, "mirror": d.mirror}
                         for name, d in sorted(debs.items())}}


def resolve_group(p: NodeProfile, group: str, src: Sources) -> dict[str, Any] | None:
    """One group of one node's lock (None: not part of this node)."""
    inputs = group_inputs(p, group)
    if inputs is None:
        return None
    where = f"nodes.{p.name}"
    debs = [d for url in repo_urls(p) for d in src.apt.get(url, [])]
    index = AptIndex(debs)
    out: dict[str, Any] = {"site": inputs}
    if group == "nvidia":
        if p.nvidia.source != "cuda-repo":
            out["note"] = ("ubuntu-archive: driver packages come from the Ubuntu archive, "
                           "not resolved by gpunode lock")
            return out
        names = desired.driver_packages(p)
        prefix = f"{p.nvidia.version}-" if p.nvidia.version else f"{p.nvidia.branch}."
        candidates = [upstream(d.version) for name in names for d in index.by_name.get(name, [])
                      if upstream(d.version).startswith(prefix.rstrip("-"))
                      and (not p.nvidia.version or upstream(d.version) == p.nvidia.version)]
        # the newest version of the branch that every top-level driver package offers
        common = [v for v in set(candidates)
                  if all(any(upstream(d.version) == v for d in index.by_name.get(n, []))
                         for n in names)]
        if not common:
            raise LockError([f"{where}.nvidia: no version of {', '.join(names)} in branch "
                             f"{p.nvidia.branch}{' = ' + p.nvidia.version if p.nvidia.version else ''}"
                             f" in {', '.join(repo_urls(p))}"])
        driver = max(common, key=lambda v: _Key(Deb("", v)))
        roots = {n: index.newest(n, lambda d: upstream(d.version) == driver) for n in names}
        pin = desired.pinning_package(p)
        if pin and index.newest(pin):
            roots[pin] = index.newest(pin)  # type: ignore[assignment]
        chosen = closure(index, {k: v for k, v in roots.items() if v is not None},
                         prefer=lambda d: upstream(d.version) == driver)
        out["driver"] = driver
        out.update(_apt_group(chosen))
        return out
    if group in ("cuda", "nccl", "cudnn", "container-toolkit", "dcgm"):
        pkgs = {"cuda": desired.cuda_packages, "nccl": desired.nccl_packages,
                "cudnn": desired.cudnn_packages,
                "container-toolkit": desired.container_toolkit_packages,
                "dcgm": desired.dcgm_packages}[group](p)
        roots = _exact(index, pkgs, f"{where}.{group}")
        out.update(_apt_group(closure(index, roots)))
        return out
    if group == "vllm":
        index_url = p.vllm.index_url or "https://pypi.org/simple/"
        py = resolve_python([f"vllm=={p.vllm.version}"], p.vllm.python,
                            lambda name: src.listing(index_url, name), src.metadata)
        out["mirror"] = index_url
        out["dependency_hash"] = py.dependency_hash()
        out["packages"] = py.packages
        return out
    if group == "image":
        identity = src.image(p)
        if identity is None:
            raise LockError([f"{where}.vm: {p.vm.cloud_image or f'template {p.vm.template_vmid}'}"  # type: ignore[union-attr]
                             f" is not on PVE node {p.vm.pve_node}"])  # type: ignore[union-attr]
        out["identity"] = identity
        return out
    # models: revisions are pinned by the site model (40-hex); the lock records them
    out["services"] = {s.name: {"model": s.model, "revision": s.revision}
                       for s in p.vllm.services}
    return out


def resolve_node(p: NodeProfile, src: Sources, groups: tuple[str, ...] = GROUPS,
                 keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """A node's lock entry: `groups` resolved afresh, the others taken from `keep`."""
    keep = keep or {}
    out: dict[str, Any] = {}
    for g in GROUPS:
        if g in groups or g not in keep:
            entry = resolve_group(p, g, src)
        else:
            entry = keep[g] if group_inputs(p, g) is not None else None
        if entry is not None:
            out[g] = entry
    return out


# --- file --------------------------------------------------------------------------------

def dump_lock(nodes: dict[str, dict[str, Any]], site_name: str) -> str:
    doc = {"format": FORMAT, "site": site_name, "nodes": dict(sorted(nodes.items()))}
    return HEADER + yaml.safe_dump(doc, sort_keys=True, default_flow_style=False, width=100)


def read_lock(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LockError([f"{path}: cannot read the lock file: {exc}"]) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(
            doc.get("nodes"), dict):
        raise LockError([f"{path}: not a gpunode lock file of format {FORMAT}; run "
                         "`gpunode lock --update` to write it again"])
    return doc


def check_lock(site: Any, doc: dict[str, Any], path: Path) -> list[str]:
    """Where the site and its lock disagree: one line per field, saying how to update."""
    problems = []
    locked = doc["nodes"]
    for name, p in site.nodes.items():
        entry = locked.get(name)
        if not isinstance(entry, dict):
            problems.append(f"{site.path}: nodes.{name}: not in the lock {path.name}; run "
                            "`gpunode lock` to add it")
            continue
        for g in GROUPS:
            want = group_inputs(p, g)
            have = entry.get(g)
            if want is None and have is None:
                continue
            if have is None:
                field_ = next(iter(want or {}))
                problems.append(f"{site.path}: nodes.{name}.{_enabler(g, field_)}: enabled in the "
                                f"site but not in {path.name}; run `gpunode lock` to resolve it")
                continue
            if want is None:
                problems.append(f"{site.path}: nodes.{name}.{_enabler(g, '')}: off in the site "
                                f"but locked in {path.name}; run `gpunode lock` to drop it")
                continue
            recorded = have.get("site", {})
            for key in sorted(set(want) | set(recorded)):
                if want.get(key) != recorded.get(key):
                    problems.append(
                        f"{site.path}: nodes.{name}.{key}: the site says "
                        f"{_show(want.get(key))}, {path.name} was resolved for "
                        f"{_show(recorded.get(key))}; run `gpunode lock --update {g}` "
                        "(or change the site back)")
    for name in sorted(set(locked) - set(site.nodes)):
        problems.append(f"{path}: nodes.{name}: locked but not in the site; run `gpunode lock` "
                        "to drop it")
    return problems


def _enabler(group: str, field_: str) -> str:
    return {"cuda": "cuda.enabled", "nccl": "nccl.enabled", "cudnn": "cudnn.enabled",
            "container-toolkit": "container_toolkit.enabled", "dcgm": "dcgm.enabled",
            "vllm": "vllm.services", "models": "vllm.services",
            "image": "vm"}.get(group, field_ or group)


def _show(value: Any) -> str:
    return "nothing" if value is None else repr(value) if isinstance(value, str) else str(value)


#: Groups whose every locked package the deploy installs at its locked version (the
#: driver set is pinned through `nvidia.version` and apt preferences).
EXACT_GROUPS: tuple[str, ...] = get_args(LockedGroup)


def apply_lock(site: Any, doc: dict[str, Any], path: Path | None = None) -> Any:
    """The site as both engines receive it: the lock's driver version where the site leaves
    it open, every package of the exact groups at its locked version (`locked`) and the vLLM
    venv's exact set with its wheel hashes (`locked_vllm`), and a pve-guest's image identity
    (`locked_image`: `provision` creates its VM from that image only). A lock
    edited into something that is not a package name or version is refused (SiteError)."""
    from pydantic import ValidationError

    from gpunode.inventory import SiteError
    from gpunode.model import NodeProfile

    where = path.name if path else "the lock"
    nodes, problems = {}, []
    for name, p in site.nodes.items():
        entry = doc["nodes"].get(name) or {}
        update: dict[str, Any] = {}
        driver = (entry.get("nvidia") or {}).get("driver")
        if driver and not p.nvidia.version:
            update["nvidia"] = p.nvidia.model_dump() | {"version": driver}
        locked = {g: {n: (i or {}).get("version") for n, i in
                      ((entry.get(g) or {}).get("packages") or {}).items()}
                  for g in EXACT_GROUPS if (entry.get(g) or {}).get("packages")}
        if locked:
            update["locked"] = locked
        py = ((entry.get("vllm") or {}).get("packages") or {}) if p.vllm.services else {}
        if py:
            update["locked_vllm"] = py
        image = (entry.get("image") or {}).get("identity")
        if image and p.kind == "pve-guest":
            update["locked_image"] = image
        if update:
            try:
                p = NodeProfile.model_validate(p.model_dump() | update)
            except ValidationError as exc:
                for err in exc.errors():
                    loc = ".".join(str(x) for x in err["loc"])
                    problems.append(f"{where}: nodes.{name}: {loc}: {err['msg']} (a hand edit? "
                                    "run `gpunode lock --update` to write it again)")
                continue
        nodes[name] = p
    if problems:
        raise SiteError(problems)
    return replace(site, nodes=nodes)


def locked_site(site: Any) -> Any:
    """The site as deploys use it: unchanged without a lock; with `<site>.lock`, checked
    against the lock (SiteError, exit 2, when they disagree) and with its versions applied."""
    from gpunode.inventory import SiteError

    path = lock_path(Path(site.path))
    if not path.is_file():
        return site
    try:
        doc = read_lock(path)
    except LockError as exc:
        raise SiteError(exc.lines) from None
    problems = check_lock(site, doc, path)
    if problems:
        raise SiteError(problems)
    return apply_lock(site, doc, path)


def locked_packages(entry: dict[str, Any]) -> dict[str, str]:
    """Every apt package a node's lock entry pins: name -> Debian version."""
    out = {}
    for g in GROUPS:
        for name, info in (entry.get(g) or {}).get("packages", {}).items():
            if g != "vllm":
                out[name] = info["version"]
    return out


def group_of(entry: dict[str, Any], word: str) -> str | None:
    """Which group `--update WORD` means: a group name, or a package locked in one."""
    if word in GROUPS:
        return word
    for g in GROUPS:
        group = entry.get(g) or {}
        if normalize(word) in {normalize(n) for n in group.get("packages", {})} or \
                word in group.get("services", {}):
            return g
    return None
