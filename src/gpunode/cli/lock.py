"""`gpunode lock`, `gpunode manifest`, `gpunode drift`: reproducible nodes.

`lock` reads the repositories and the Python index the site configures (over HTTP; `--via`
rewrites a URL prefix for this machine only, e.g. the lab's guest alias 10.0.2.2 to
127.0.0.1, while the lock records the site's URL as the mirror)."""

from __future__ import annotations

import gzip
import io
import json
import sys
import urllib.error
import urllib.request
import zipfile
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import typer

from gpunode.core import lock as lk


class Fetcher:
    """HTTP reads for resolution, with prefix rewrites (`--via FROM=TO`)."""

    def __init__(self, via: list[str] | None = None, timeout: float = 60):
        self.rewrites = []
        for item in via or []:
            src, sep, dst = item.partition("=")
            if not sep or not src or not dst:
                raise lk.LockError([f"--via: {item!r} is not FROM=TO (two URL prefixes)"])
            self.rewrites.append((src, dst))
        self.timeout = timeout
        self.get = cache(self._get)

    def url(self, url: str) -> str:
        for src, dst in self.rewrites:
            if url.startswith(src):
                return dst + url[len(src):]
        return url

    def _get(self, url: str) -> bytes | None:
        real = self.url(url)
        if real.startswith("file:") and real.endswith("/"):
            real += "index.html"  # a directory of a file:// mirror
        try:
            with urllib.request.urlopen(real, timeout=self.timeout) as resp:  # noqa: S310
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise lk.LockError([f"{real}: HTTP {exc.code} {exc.reason}"]) from None
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(getattr(exc, "reason", exc), FileNotFoundError) or isinstance(
                    exc, FileNotFoundError):
                return None  # a file:// mirror without that file
            raise lk.LockError([f"{real}: cannot read it ({getattr(exc, 'reason', exc)}); is "
                                "the mirror reachable from this machine (see --via)?"]) from None

    def packages(self, repo: str) -> list[lk.Deb]:
        data = self.get(repo + "Packages.gz")
        if data is not None:
            data = gzip.decompress(data)
        else:
            data = self.get(repo + "Packages")
        if data is None:
            raise lk.LockError([f"{self.url(repo)}: no Packages or Packages.gz (not an apt "
                                "repository?)"])
        return lk.parse_packages(data.decode("utf-8", "replace"), mirror=repo)

    def listing(self, index: str, name: str) -> list[lk.Dist]:
        page = f"{index.rstrip('/')}/{lk.normalize(name)}/"
        data = self.get(page)
        return [] if data is None else lk.parse_simple_page(data.decode(), page)

    def metadata(self, dist: lk.Dist) -> list[str]:
        meta = self.get(dist.url + ".metadata")
        if meta is None:
            wheel = self.get(dist.url)
            if wheel is None:
                raise lk.LockError([f"{self.url(dist.url)}: not found"])
            with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
                name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
                meta = zf.read(name)
        return lk.requires_dist(meta.decode("utf-8", "replace"))

    def sources(self, profiles: list[Any], site: Any = None) -> lk.Sources:
        apt = {url: self.packages(url) for p in profiles for url in lk.repo_urls(p)}
        return lk.Sources(apt=apt, listing=self.listing, metadata=self.metadata,
                          image=pve_images(site) if site is not None else lambda p: None)


def pve_images(site: Any) -> Any:
    """A pve-guest's image or template as its PVE API shows it, read with the credentials
    `provision` uses (endpoints and logins made on the first node that needs one)."""
    from gpunode.proxmox import run
    from gpunode.proxmox.client import Pve
    from gpunode.proxmox.errors import PveError, PveInputError
    from gpunode.proxmox.state import image_identity, read_vm

    logins: dict[str, Any] = {}

    def image(p: Any) -> dict[str, Any] | None:
        try:
            ep = run.endpoints_for(site, [p.name])[0]
            t = ep.targets[0]
            if ep.label not in logins:
                logins[ep.label] = Pve(ep.creds)
            pve = logins[ep.label]
            template = (read_vm(pve, t.pve_node, t.template_vmid) if t.template_vmid
                        else None)
            return image_identity(pve, t.pve_node, t.cloud_image, template)
        except run.InputProblems as exc:
            raise lk.LockError(exc.lines) from None
        except (PveError, PveInputError) as exc:
            raise lk.LockError([f"nodes.{p.name}.vm: reading its image from PVE: {exc}"]) \
                from None

    return image


def lock_command(
    update: Annotated[bool, typer.Option("--update", help="Re-resolve (all, or the GROUP/"
                                         "PACKAGE arguments) instead of keeping locked versions.")]
    = False,
    packages: Annotated[list[str] | None, typer.Argument(
        help="With --update: groups (nvidia, cuda, nccl, cudnn, container-toolkit, dcgm, vllm, "
        "models) or package names; only their groups move.")] = None,
    site: Annotated[str | None, typer.Option("--site", help="Site file.")] = None,
    via: Annotated[list[str] | None, typer.Option(
        "--via", help="FROM=TO: read URLs starting with FROM at TO instead (this machine "
        "only; the lock records FROM).")] = None,
) -> None:
    """Resolve every version the site leaves open and write <site>.lock beside it."""
    from gpunode.cli import fail_input
    from gpunode.inventory import SiteError, load_site

    try:
        loaded = load_site(site)  # the site as written: the lock is what is being made
    except SiteError as exc:
        raise fail_input(exc.lines) from None
    path = lk.lock_path(Path(loaded.path))
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = lk.read_lock(path)["nodes"]
        except lk.LockError:
            old = {}
    if packages and not update:
        raise fail_input(["PACKAGE arguments need --update (`gpunode lock --update nvidia`)"])
    nodes: dict[str, Any] = {}
    try:
        fetcher = Fetcher(via)
        src = fetcher.sources(list(loaded.nodes.values()), loaded)
        for name, p in loaded.nodes.items():
            keep = dict(old.get(name) or {})
            if update and not packages:
                groups = lk.GROUPS
            else:
                groups = ()
                if packages:
                    chosen = set()
                    for word in packages:
                        g = lk.group_of(keep, word) or (word if word in lk.GROUPS else None)
                        if g is None and not any(lk.group_of(old.get(n) or {}, word)
                                                 for n in old):
                            raise fail_input([f"--update {word}: neither a group ("
                                              f"{', '.join(lk.GROUPS)}) nor a locked package"])
                        if g:
                            chosen.add(g)
                    groups = tuple(sorted(chosen))
                # groups whose site inputs changed are re-resolved too
                for g in lk.GROUPS:
                    if g in keep and (keep[g] or {}).get("site") != lk.group_inputs(p, g):
                        keep.pop(g)
            nodes[name] = lk.resolve_node(p, src, groups, keep)
    except lk.LockError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        raise typer.Exit(1) from None
    text = lk.dump_lock(nodes, Path(loaded.path).name)
    before = path.read_text() if path.is_file() else None
    path.write_text(text)
    moved = _moves(old, nodes)
    for line in moved:
        print(line)
    print(f"{'unchanged' if before == text else 'wrote'} {path} ({len(nodes)} node(s), "
          f"{len(moved)} change(s))")


def _moves(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per package whose locked version changed (for review)."""
    out = []
    for name in sorted(set(old) | set(new)):
        before = lk.locked_packages(old.get(name) or {})
        after = lk.locked_packages(new.get(name) or {})
        for g in ("vllm",):
            before.update({f"py:{k}": v["version"] for k, v in
                           ((old.get(name) or {}).get(g) or {}).get("packages", {}).items()})
            after.update({f"py:{k}": v["version"] for k, v in
                          ((new.get(name) or {}).get(g) or {}).get("packages", {}).items()})
        if not before and after:
            out.append(f"{name}: {len(after)} package(s) locked")
            continue
        for pkg in sorted(set(before) | set(after)):
            if before.get(pkg) != after.get(pkg):
                out.append(f"{name}: {pkg} {before.get(pkg) or '-'} -> {after.get(pkg) or '-'}")
    return out


def manifest_command(
    node: Annotated[str, typer.Argument(help="Node name.")],
    site: Annotated[str | None, typer.Option("--site", help="Site file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print the manifest the deploy wrote on NODE (/var/lib/gpunode/manifest.json)."""
    from gpunode.cli import fail_input
    from gpunode.cli.main import open_site
    from gpunode.core import manifest as mf
    from gpunode.inventory import SiteError

    loaded = open_site(site, deep=False)
    try:
        p = loaded.select([node])[0]
    except SiteError as exc:
        raise fail_input(exc.lines) from None
    rc, out, err = mf.run_on(p, f"cat {mf.MANIFEST_PATH}")
    if rc != 0:
        print(f"{node}: cannot read {mf.MANIFEST_PATH} ({err.strip() or out.strip() or rc}); "
              "has gpunode deploy run on it?", file=sys.stderr)
        raise typer.Exit(1)
    try:
        doc = json.loads(out)
    except ValueError:
        print(f"{node}: {mf.MANIFEST_PATH} is not JSON", file=sys.stderr)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    for line in mf.summary(doc):
        print(line)


def drift_command(
    nodes: Annotated[list[str] | None, typer.Argument(help="Nodes or groups.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every node in the site.")] = False,
    site: Annotated[str | None, typer.Option("--site", help="Site file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """Compare NODE... live (one snapshot command each) against the lock and the files the
    deploy writes, and against siblings in the same group; exit 1 on drift."""
    from gpunode.cli import fail_input, output
    from gpunode.cli.main import open_site
    from gpunode.core import drift as dr
    from gpunode.core import manifest as mf
    from gpunode.inventory import SiteError

    loaded = open_site(site, deep=False)
    if not nodes and not all_:
        raise fail_input(["name nodes or groups, or pass --all"])
    try:
        chosen = loaded.select(nodes if not all_ else [])
    except SiteError as exc:
        raise fail_input(exc.lines) from None
    path = lk.lock_path(Path(loaded.path))
    doc = lk.read_lock(path) if path.is_file() else None
    live: dict[str, Any] = {}
    unreachable: dict[str, str] = {}
    # siblings of the chosen nodes are read too (same group), to compare against
    wanted = {p.name: p for p in chosen}
    for p in chosen:
        for g in p.groups:
            for other in loaded.groups.get(g, []):
                wanted.setdefault(other, loaded.nodes[other])
    for name, p in wanted.items():
        try:
            live[name] = mf.read_live(p)
        except mf.HostError as exc:
            unreachable[name] = str(exc)
    findings = dr.compare(loaded, [p.name for p in chosen], live, doc)
    findings += [dr.Finding(n, "host", "reachable", "no", why) for n, why in unreachable.items()
                 if n in {p.name for p in chosen}]
    if as_json:
        print(json.dumps({"drift": bool(findings), "findings": [f.__dict__ for f in findings]},
                         indent=2, sort_keys=True))
    else:
        out = output.console()
        cols = [output.Column(c) for c in ("node", "kind", "item")]
        cols += [output.Column("expected", wrap=True), output.Column("live", wrap=True)]
        rows: list[list[str] | None] = [[f.node, f.kind, f.item, f.expected, f.live]
                                        for f in findings]
        if rows:
            output.print_table(out, "gpunode drift", cols, rows)
        names = ", ".join(p.name for p in chosen)
        out.print(f"{'drift' if findings else 'no drift'}: {names} ({len(findings)} finding(s))",
                  highlight=False, markup=False)
    raise typer.Exit(1 if findings else 0)
