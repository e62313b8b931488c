"""gpunode.core.paths owns the host paths: nothing else spells the vLLM ones, the roles spell
none; a managed file carries its identity; one snapshot spec builder."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from gpunode import facts
from gpunode.core import paths
from gpunode.core.files import node_files, restart_inputs
from gpunode.core.topology import Gpu
from gpunode.inventory import load_site
from gpunode.model import NodeProfile

REPO = Path(__file__).resolve().parents[2]
#: Fragments of the vLLM drop-in, credential, config and unit paths, and gpunode's state.
VLLM_FRAGMENTS = ("/etc/vllm", ".service.d/gpunode.conf", "/etc/systemd/system/vllm",
                  "/usr/local/lib/gpunode", "/var/lib/gpunode")
#: Any absolute path below the directories gpunode writes into.
HOST_PATH = re.compile(r"(?<![\w.])/(etc|var|usr|run|opt)/[\w.@*%{}-]")


def _sources(*dirs: str, exts: tuple[str, ...] = (".py", ".yml", ".yaml")) -> list[Path]:
    return sorted(f for d in dirs for f in (REPO / d).rglob("*")
                  if f.suffix in exts and f.is_file())


def _code_strings(f: Path) -> list[tuple[int, str]]:
    """The string literals of a Python file, docstrings left out (prose may name a path)."""
    tree = ast.parse(f.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def _yaml_lines(f: Path) -> list[tuple[int, str]]:
    """A YAML file's lines, comments left out."""
    return [(n, line) for n, line in enumerate(f.read_text().splitlines(), 1)
            if not line.lstrip().startswith("#")]


def test_vllm_paths_are_spelled_only_in_paths_py():
    offenders = []
    for f in _sources("src/gpunode", "deploy", "checks", "roles", "playbooks"):
        if f == REPO / "src/gpunode/core/paths.py" or "lab" in f.relative_to(REPO).parts:
            continue  # the lab's simulated packages ship their own files
        lines = _code_strings(f) if f.suffix == ".py" else _yaml_lines(f)
        offenders += [f"{f.relative_to(REPO)}:{n}: {text.strip()}" for n, text in lines
                      if any(frag in text for frag in VLLM_FRAGMENTS)]
    assert not offenders, "\n".join(offenders)


def test_roles_spell_no_host_path():
    """The roles' YAML takes every gpunode host path from the action plugins' facts."""
    offenders = [f"{f.relative_to(REPO)}:{n}: {line.strip()}"
                 for f in _sources("roles", exts=(".yml", ".yaml"))
                 for n, line in _yaml_lines(f) if HOST_PATH.search(line)]
    assert not offenders, "\n".join(offenders)


def _gpus(n: int) -> list[Gpu]:
    return [Gpu(index=i, uuid=f"GPU-{i:08d}", name="sim", bus_id=f"00000000:{i + 1:02x}:00.0",
                memory_mib=49140, driver_version="580.95.05", cpus=[2 * i, 2 * i + 1],
                numa_node=0) for i in range(n)]


def _examples() -> list[NodeProfile]:
    return [p for site in sorted((REPO / "inventory/examples").glob("*.yaml"))
            for p in load_site(site).nodes.values()]


@pytest.mark.parametrize("p", [p for p in _examples() if p.vllm.services],
                         ids=lambda p: p.name)
def test_managed_files_carry_their_identity(p: NodeProfile):
    gpus = _gpus(max(g for s in p.vllm.services for g in s.gpus) + 2)
    files = node_files(p, gpus)
    names = {s.name for s in p.vllm.services}
    for f in files:
        assert f.scope in ("node", "service"), f.path
        if f.scope == "service":
            assert f.service in names and f.restart == (paths.vllm_unit(f.service),), f.path
            assert f.path in (paths.vllm_config(f.service), paths.vllm_env(f.service),
                              paths.vllm_unit_dropin(f.service))
        else:
            assert f.service is None, f.path
    by_path = {f.path: f for f in files}
    assert by_path[paths.PERSISTENCED_DROPIN].restart == (paths.PERSISTENCED_UNIT,)
    every = tuple(paths.vllm_unit(s.name) for s in p.vllm.services)
    for shared in (*paths.TEMPLATE_UNITS, *paths.SCRIPTS):
        assert by_path[shared].restart == every
    for s in p.vllm.services:
        inputs = restart_inputs(p, s.name)
        mine = {f.path for f in files if paths.vllm_unit(s.name) in f.restart}
        assert mine <= set(inputs)  # every file naming the unit restarts it
        assert {paths.credential_path(s.name), paths.HF_TOKEN_PATH} <= set(inputs)


def test_one_snapshot_spec_builder():
    """facts.node_spec is the only spec builder and facts.managed_paths the only
    managed_paths: no other module defines either."""
    defs = re.compile(r"^def (managed_paths|\w*snapshot_spec|node_spec)\(", re.M)
    found = [(f.relative_to(REPO).as_posix(), m.group(1))
             for f in _sources("src/gpunode", "checks", exts=(".py",))
             for m in defs.finditer(f.read_text())]
    assert sorted(found) == [("src/gpunode/facts/__init__.py", "managed_paths"),
                             ("src/gpunode/facts/__init__.py", "node_spec")]


@pytest.mark.parametrize("p", _examples(), ids=lambda p: p.name)
def test_node_spec_stats_every_managed_path(p: NodeProfile):
    spec = facts.node_spec(p)
    assert spec["paths"] == sorted(set(facts.managed_paths(p)))
    if p.kind != "pve-host":
        assert paths.MANIFEST_PATH in spec["paths"]
        assert {f.path for f in node_files(p)} <= set(spec["paths"])
