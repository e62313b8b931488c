"""`gpunode lab status` and `down` see every lab the toolkit made: the default one,
`make demo`'s `.lab/demo`, test sessions' `.lab/pytest/run-<pid>` and labs made with
`--state-dir`; `down --all --purge` deletes them and says how much it freed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpunode.lab import cli as lab_cli
from gpunode.lab.core import VMConfig


def make_lab(d: Path, vm: str, mib: int = 1) -> Path:
    vdir = d / "vms" / vm
    vdir.mkdir(parents=True)
    VMConfig(name=vm, cpus=2, memory_mib=2048, numa=2, disk_gib=8, ssh_port=2299,
             forwards={}, instance_id=f"{vm}-0", origin={"kind": "base"}).save(vdir / "vm.json")
    (vdir / "disk.qcow2").write_bytes(b"\1" * (mib << 20))
    return d


@pytest.fixture
def labs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    checkout = tmp_path / "checkout"
    (checkout / ".lab").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(lab_cli, "_CHECKOUT", checkout)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GPUNODE_LAB_DIR", raising=False)
    dead = 2**22 + 12345  # above pid_max's default: no such process
    out = {
        "demo": make_lab(checkout / ".lab/demo", "labgpu1", 2),
        "dead_run": make_lab(checkout / f".lab/pytest/run-{dead}", "labvm"),
        "live_run": make_lab(checkout / f".lab/pytest/run-{os.getppid()}", "labvm"),
        "elsewhere": tmp_path / "elsewhere",
    }
    # A lab made with `lab up --state-dir` is remembered (up calls remember before booting).
    lab_cli.remember(out["elsewhere"])
    make_lab(out["elsewhere"], "n1")
    return out


def invoke(*args: str):
    result = CliRunner().invoke(lab_cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_status_lists_every_lab_with_its_disk_use(labs: dict[str, Path]) -> None:
    doc = json.loads(invoke("status", "--json"))
    listed = {Path(lab["state_dir"]): lab for lab in doc["labs"]}
    for key in ("demo", "dead_run", "live_run", "elsewhere"):
        assert labs[key] in listed, key
    assert listed[labs["demo"]]["vms"][0]["name"] == "labgpu1"
    assert listed[labs["demo"]]["disk_bytes"] >= 2 << 20
    text = invoke("status")
    assert f"{labs['demo']} (2.0 MiB on disk)" in text
    assert "labgpu1" in text and "stopped" in text
    only = json.loads(invoke("status", "--json", "--state-dir", str(labs["demo"])))
    assert [Path(lab["state_dir"]) for lab in only["labs"]] == [labs["demo"]]


def test_down_finds_the_lab_holding_the_vm(labs: dict[str, Path]) -> None:
    assert "labgpu1: down" in invoke("down", "labgpu1")


def test_down_all_purge_deletes_the_labs_but_not_a_live_session(labs: dict[str, Path]) -> None:
    text = invoke("down", "--all", "--purge")
    for key in ("demo", "dead_run", "elsewhere"):
        assert not labs[key].exists(), key
        assert f"{labs[key]}: purged" in text
    assert "2.0 MiB freed" in text
    assert labs["live_run"].exists()
    assert f"in use by the test session pid {os.getppid()}" in text
    left = json.loads(invoke("status", "--json"))["labs"]
    assert {Path(lab["state_dir"]) for lab in left} == {
        Path(lab_cli.lab_paths.default_state_dir()).absolute(), labs["live_run"]}
