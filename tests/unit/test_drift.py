"""gpunode.core.drift: live state (SIMULATED snapshots) against the lock, gpunode's files and the
siblings in the same group; `gpunode drift` table, --json and exit codes."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpunode.cli.main import app
from gpunode.core import drift, lock, manifest
from gpunode.core.files import node_files
from gpunode.inventory import load_site

SITE = """
site: {name: drifttest}
defaults:
  os: debian-12
  connection: {address: 127.0.0.1, user: root}
  nvidia: {branch: 580, version: 580.82.07}
groups:
  fleet: {gpus: {count: 0}}
nodes:
  gpu01: {groups: [fleet], connection: {port: 2201}}
  gpu02: {groups: [fleet], connection: {port: 2202}}
"""
PKGS = {"nvidia-driver-cuda": "580.82.07-1", "libcuda1": "580.82.07-1",
        "nvidia-driver-pinning-580": "580-5"}


@pytest.fixture
def site(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(SITE)
    return load_site(path)


def _lock_doc(site) -> dict:
    nodes = {}
    for name, p in site.nodes.items():
        nodes[name] = {"nvidia": {"site": lock.group_inputs(p, "nvidia"), "driver": "580.82.07",
                                  "packages": {n: {"version": v, "sha256": "", "mirror": "M/"}
                                               for n, v in PKGS.items()}}}
    return {"format": 1, "nodes": nodes}


def _live(p, packages=None, edit: str | None = None) -> dict:
    files = {f.path: {"mode": f"{f.mode:04o}", "owner": f.owner, "group": f.group,
                      "sha256": hashlib.sha256(f.content.encode()).hexdigest()}
             for f in node_files(p)}
    if edit:
        files[edit]["sha256"] = hashlib.sha256(b"edited by hand").hexdigest()
    data = {"kernel": "6.1.0-30-amd64", "packages": dict(packages or PKGS), "holds": [],
            "files": files, "venvs": {}, "cmds": {}, "nvidia_smi": {"present": False},
            "nvidia_proc_version": "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  "
                                   "580.82.07  Release Build"}
    return {"snapshot": data, "manifest": manifest.build(p, data), "written": None}


def test_a_converged_fleet_has_no_drift(site):
    live = {n: _live(p) for n, p in site.nodes.items()}
    assert drift.compare(site, ["gpu01", "gpu02"], live, _lock_doc(site)) == []


def test_other_package_version_and_hand_edited_file_are_named(site):
    p1, p2 = site.nodes["gpu01"], site.nodes["gpu02"]
    live = {"gpu01": _live(p1, {**PKGS, "libcuda1": "580.95.05-1"},
                           edit="/etc/sysctl.d/60-gpunode.conf"),
            "gpu02": _live(p2)}
    found = drift.compare(site, ["gpu01"], live, _lock_doc(site))
    got = {(f.kind, f.item, f.expected, f.live) for f in found}
    assert ("lock", "libcuda1", "580.82.07-1", "580.95.05-1") in got
    assert ("sibling:gpu02", "package libcuda1", "580.82.07-1", "580.95.05-1") in got
    assert any(k == "file" and i == "/etc/sysctl.d/60-gpunode.conf" for k, i, _, _ in got)
    assert all(f.node == "gpu01" for f in found)


def test_unlocked_package_missing_package_and_module(site):
    p = site.nodes["gpu01"]
    pk = {k: v for k, v in PKGS.items() if k != "libcuda1"}
    pk["libnccl2"] = "2.28.3-1+cuda13.0"
    live = {"gpu01": _live(p, pk)}
    live["gpu01"]["manifest"]["driver_module"] = "580.95.05"
    got = {(f.item, f.expected, f.live) for f in drift.against_lock(
        "gpu01", _lock_doc(site)["nodes"]["gpu01"], live["gpu01"]["manifest"])}
    assert ("libcuda1", "580.82.07-1", "not installed") in got
    assert ("libnccl2", "not locked", "2.28.3-1+cuda13.0") in got
    assert ("driver module loaded", "580.82.07", "580.95.05") in got


def test_python_packages_against_the_lock(site):
    entry = {"vllm": {"packages": {"vllm": {"version": "0.33.0"}, "PyYAML": {"version": "6.0.3"}}}}
    m = {"vllm": {"packages": {"vllm": "0.33.0", "pyyaml": "6.0.2", "rich": "13.0.0"}}}
    got = {(f.item, f.expected, f.live) for f in drift.against_lock("gpu01", entry, m)}
    assert got == {("python pyyaml", "6.0.3", "6.0.2"), ("python rich", "not locked", "13.0.0")}


def test_files_recorded_by_the_last_deploy_count_too(site):
    p = site.nodes["gpu01"]
    host = _live(p)
    host["snapshot"]["files"]["/etc/gpunode/extra"] = {"sha256": "cd" * 32}
    written = {"files": {"/etc/gpunode/extra": "ab" * 32}}
    found = drift.against_files(p, host["snapshot"], written)
    assert [(f.item, f.live) for f in found] == [("/etc/gpunode/extra", "sha256 " + "cd" * 6)]


def test_drift_command_table_json_and_exit_codes(site, monkeypatch, tmp_path):
    lock_path = tmp_path / "site.lock"
    lock_path.write_text(lock.dump_lock(_lock_doc(site)["nodes"], "site.yaml"))
    state = {n: _live(p) for n, p in site.nodes.items()}
    monkeypatch.setattr(manifest, "read_live", lambda p: copy.deepcopy(state[p.name]))
    run = CliRunner().invoke
    res = run(app, ["drift", "--all", "--site", str(site.path)])
    assert res.exit_code == 0, res.output
    assert "no drift" in res.output
    state["gpu02"] = _live(site.nodes["gpu02"], {**PKGS, "libcuda1": "580.95.05-1"},
                           edit="/etc/sysctl.d/60-gpunode.conf")
    res = run(app, ["drift", "gpu02", "--site", str(site.path)], env={"COLUMNS": "200"})
    assert res.exit_code == 1
    assert "libcuda1" in res.output and "/etc/sysctl.d/60-gpunode.conf" in res.output
    res = run(app, ["drift", "fleet", "--json", "--site", str(site.path)])
    doc = json.loads(res.output)
    assert res.exit_code == 1 and doc["drift"] is True
    assert {f["node"] for f in doc["findings"]} == {"gpu01", "gpu02"}  # each against the other
    assert run(app, ["drift", "--site", str(site.path)]).exit_code == 2


def test_drift_refuses_a_lock_that_disagrees(site, monkeypatch, tmp_path):
    (tmp_path / "site.lock").write_text(lock.dump_lock(_lock_doc(site)["nodes"], "site.yaml"))
    Path(site.path).write_text(SITE.replace("version: 580.82.07", "version: 580.95.05"))
    monkeypatch.setattr(manifest, "read_live", lambda p: pytest.fail("host read"))
    res = CliRunner().invoke(app, ["drift", "--all", "--site", str(site.path)])
    assert res.exit_code == 2 and "nvidia.version" in res.output


def test_a_locked_dependency_the_manifest_does_not_record_is_not_judged(site):
    """The lock holds a repository's whole dependency closure (the lab's gpunode-sim-base,
    say); the manifest records gpunode's managed names only, so such a package is neither
    'not installed' nor drift."""
    p = site.nodes["gpu01"]
    entry = copy.deepcopy(_lock_doc(site)["nodes"]["gpu01"])
    entry["nvidia"]["packages"]["gpunode-sim-base"] = {"version": "0.1-1", "sha256": "",
                                                       "mirror": "M/"}
    assert not manifest.managed_package("gpunode-sim-base")
    assert drift.against_lock("gpu01", entry, _live(p)["manifest"]) == []
