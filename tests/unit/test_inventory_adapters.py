"""Both engine adapters expose the same hosts, groups and resolved profiles: compared in
the library (to_ansible vs to_pyinfra) and through the real engines' own CLIs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpunode.inventory import load_site, to_ansible, to_pyinfra
from gpunode.inventory.loader import KIND_GROUPS, Site

IMPLICIT_PYINFRA_GROUPS = {"pyinfra_inventory", "all"}


def engine_groups(site: Site) -> dict[str, set[str]]:
    """The site's groups, and the per-kind groups the adapters add (non-empty ones)."""
    out = {g: set(m) for g, m in site.groups.items() if m}
    for kind, group in KIND_GROUPS.items():
        members = {n for n, p in site.nodes.items() if p.kind == kind}
        if members:
            out[group] = members
    return out


def unwrap_unsafe(value: Any) -> Any:
    """The data Ansible sees: {"__ansible_unsafe": s} is the string s (never templated)."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            assert isinstance(value["__ansible_unsafe"], str)
            return value["__ansible_unsafe"]
        return {k: unwrap_unsafe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap_unsafe(v) for v in value]
    assert not isinstance(value, str), f"a site string reaches Ansible unmarked: {value!r}"
    return value


def ansible_view(inv: dict[str, Any]) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """(host -> node, group -> hosts) from `--list` JSON; empty/implicit groups dropped."""
    nodes = {h: unwrap_unsafe(v["node"]) for h, v in inv["_meta"]["hostvars"].items()}
    groups = {g: set(v.get("hosts", [])) for g, v in inv.items()
              if g not in ("_meta", "all", "ungrouped") and v.get("hosts")}
    return nodes, groups


def pyinfra_view(groups_in: dict[str, list[tuple[str, dict[str, Any]]]]
                 ) -> tuple[dict[str, Any], dict[str, set[str]]]:
    nodes = {h: d["node"] for hosts in groups_in.values() for h, d in hosts}
    groups = {g: {h for h, _ in hosts} for g, hosts in groups_in.items()
              if g != "ungrouped" and hosts}
    return nodes, groups


def test_adapters_agree(example: Path) -> None:
    site = load_site(example)
    a_nodes, a_groups = ansible_view(to_ansible(site))
    p_nodes, p_groups = pyinfra_view(to_pyinfra(site))
    expected = {n: p.model_dump(mode="json") for n, p in site.nodes.items()}
    assert a_nodes == expected
    assert p_nodes == expected
    assert a_groups == p_groups == engine_groups(site)
    # every host is reachable in both: grouped or ungrouped
    assert set(to_ansible(site)["ungrouped"]["hosts"]) == {
        h for h, _ in to_pyinfra(site)["ungrouped"]} == {
        n for n, p in site.nodes.items() if not p.groups}


def test_adapters_same_connection(example: Path) -> None:
    site = load_site(example)
    hostvars = to_ansible(site)["_meta"]["hostvars"]
    pdata = {h: d for hosts in to_pyinfra(site).values() for h, d in hosts}
    for name, p in site.nodes.items():
        a, d = hostvars[name], pdata[name]
        assert a["ansible_host"] == d["ssh_hostname"] == p.connection.address
        assert a["ansible_port"] == d["ssh_port"] == p.connection.port
        assert a["ansible_user"] == d["ssh_user"] == p.connection.user
        assert a.get("ansible_ssh_private_key_file") == d.get("ssh_key") == p.connection.key
        assert d["_sudo"] == (p.connection.become and p.connection.user != "root")
        assert a["gpunode_site"] == d["gpunode_site"] == str(example.resolve())


def test_adapter_output_is_json(example: Path) -> None:
    site = load_site(example)
    assert json.loads(json.dumps(to_ansible(site))) == to_ansible(site)


# --- the real engines -----------------------------------------------------------------------

def engine_env(example: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUNODE_", "ANSIBLE_"))}
    # the inventory script's `#!/usr/bin/env python3` must find the venv's Python (gpunode)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GPUNODE_SITE=str(example), ANSIBLE_LOCALHOST_WARNING="False",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="False", **extra)
    return env


def tool(repo: Path, name: str) -> str:
    exe = repo / ".venv" / "bin" / name
    if not exe.exists():
        pytest.skip(f"{exe} not installed")
    return str(exe)


def test_ansible_inventory_engine(repo: Path, example: Path) -> None:
    proc = subprocess.run(
        [tool(repo, "ansible-inventory"), "-i", "inventory/ansible_inventory.py", "--list"],
        cwd=repo, env=engine_env(example), capture_output=True, text=True, timeout=120,
        check=False)
    assert proc.returncode == 0, proc.stderr
    nodes, groups = ansible_view(json.loads(proc.stdout))
    site = load_site(example)
    assert nodes == {n: p.model_dump(mode="json") for n, p in site.nodes.items()}
    assert groups == engine_groups(site)
    hostvars = json.loads(proc.stdout)["_meta"]["hostvars"]
    for name, p in site.nodes.items():
        assert hostvars[name]["ansible_host"] == p.connection.address


def parse_debug_inventory(text: str) -> dict[str, tuple[set[str], dict[str, Any]]]:
    """host -> (groups, data) from `pyinfra INVENTORY debug-inventory` output."""
    out: dict[str, tuple[set[str], dict[str, Any]]] = {}
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^\[([^\]\n]+)\]\s*$", text, flags=re.M):
        chunk = text[match.end():]
        groups = re.search(r"^--> Groups: (.*)$", chunk, flags=re.M)
        data_at = chunk.index("--> Data:") + len("--> Data:")
        assert groups is not None and groups.start() < data_at
        data, _ = decoder.raw_decode(chunk[data_at:].lstrip())
        out[match.group(1)] = ({g.strip() for g in groups.group(1).split(",")}, data)
    return out


def run_pyinfra(repo: Path, example: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(repo, "pyinfra"), "inventory/pyinfra_inventory.py", "debug-inventory"],
        cwd=repo, env=engine_env(example, **extra), capture_output=True, text=True,
        timeout=120, check=False)


def test_pyinfra_engine(repo: Path, example: Path) -> None:
    proc = run_pyinfra(repo, example)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    hosts = parse_debug_inventory(proc.stdout + proc.stderr)
    site = load_site(example)
    assert set(hosts) == set(site.nodes)
    for name, p in site.nodes.items():
        groups, data = hosts[name]
        assert data["node"] == p.model_dump(mode="json")
        assert data["ssh_hostname"] == p.connection.address
        expected = set(p.groups) if p.groups else {"ungrouped"}
        if p.kind in KIND_GROUPS:
            expected.add(KIND_GROUPS[p.kind])
        assert groups - IMPLICIT_PYINFRA_GROUPS == expected


def test_pyinfra_engine_limit(repo: Path) -> None:
    example = repo / "inventory" / "examples" / "proxmox.yaml"
    proc = run_pyinfra(repo, example, GPUNODE_LIMIT="gpuvm2")
    assert proc.returncode == 0, proc.stderr
    assert set(parse_debug_inventory(proc.stdout + proc.stderr)) == {"gpuvm2"}


@pytest.mark.parametrize("script", ["ansible_inventory.py", "pyinfra_inventory.py"])
def test_inventory_scripts_reject_bad_site(repo: Path, tmp_path: Path, script: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  gpu01:\n    connection: {address: h}\n    tunning: {}\n")
    proc = subprocess.run([str(repo / ".venv" / "bin" / "python"),
                           str(repo / "inventory" / script), "--list"],
                          env=engine_env(bad), capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert f"{bad}:4: nodes.gpu01.tunning: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ansible_script_host(repo: Path, example: Path) -> None:
    site = load_site(example)
    name = next(iter(site.nodes))
    proc = subprocess.run([str(repo / ".venv" / "bin" / "python"),
                           str(repo / "inventory" / "ansible_inventory.py"), "--host", name],
                          env=engine_env(example), capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert unwrap_unsafe(json.loads(proc.stdout)["node"]) == site.nodes[name].model_dump(
        mode="json")
