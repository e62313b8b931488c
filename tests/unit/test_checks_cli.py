"""gpunode check: ssh_config, batching, pytest arguments, result collation, JSON/JUnit."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from gpunode.cli import check as checks_cli
from gpunode.cli.main import app
from gpunode.inventory import load_site

SITE = """
defaults:
  os: debian-12
  connection: {address: 127.0.0.1, port: 2201, user: gpunode, become: true, key: keys/id}
nodes:
  gpu01: {}
  gpu02:
    connection: {address: 127.0.0.1, port: 2202, user: root}
"""


@pytest.fixture
def site(tmp_path, write_site):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_text("not a real key\n")
    return load_site(write_site(SITE))


def test_ssh_config_has_one_block_per_node(site, tmp_path, monkeypatch):
    monkeypatch.chdir("/")  # the key resolves against the site's directory
    text = checks_cli.ssh_config_text(list(site.nodes.values()), site.path)
    blocks = text.strip().split("\n\n")
    assert blocks[0].splitlines() == [
        "Host gpu01", "    HostName 127.0.0.1", "    Port 2201", "    User gpunode",
        f"    IdentityFile {tmp_path / 'keys' / 'id'}", "    StrictHostKeyChecking no",
        "    UserKnownHostsFile /dev/null"]
    assert "Port 2202" in blocks[1] and "User root" in blocks[1]
    assert "IdentityFile" in blocks[1]  # merged from defaults


def test_batches_split_by_sudo(site):
    got = checks_cli.batches(list(site.nodes.values()))
    assert [(b.sudo, b.nodes) for b in got] == [(False, ["gpu02"]), (True, ["gpu01"])]


def test_pytest_args(tmp_path):
    batch = checks_cli.Batch(True, ["gpu01", "gpu02"])
    args = checks_cli.pytest_args(batch, tmp_path / "s.yaml", tmp_path / "cfg",
                                  tmp_path / "r.json", tmp_path / "j.xml", "not slow")
    assert "--hosts=paramiko://gpu01,paramiko://gpu02" in args
    assert f"--ssh-config={tmp_path / 'cfg'}" in args
    assert "--sudo" in args and args[args.index("-m") + 1] == "not slow"
    assert f"--junitxml={tmp_path / 'j.xml'}" in args
    assert "--sudo" not in checks_cli.pytest_args(checks_cli.Batch(False, ["x"]), tmp_path,
                                                  tmp_path, tmp_path)


def _rec(host, concern, check, outcome, message=""):
    return {"host": host, "concern": concern, "check": check, "outcome": outcome,
            "message": message, "duration_s": 0.5}


def test_collate_per_host_and_concern():
    records = [
        _rec("a", "tuning", "test_sysctls", "failed", "sysctl differ: {'vm.swappiness': ('10', '60')}"),
        _rec("a", "tuning", "test_thp", "passed"),
        _rec("a", "cuda", "test_cuda_toolkit", "skipped", "cuda.enabled is false"),
        _rec("b", "tuning", "test_sysctls", "passed"),
        _rec("c", "tuning", "test_sysctls", "error", "cannot read the host: refused"),
        _rec("c", "cuda", "test_cuda_toolkit", "skipped"),
    ]
    hosts = checks_cli.collate(records, ["a", "b", "c", "d"])
    assert hosts["a"]["status"] == "drifted" and not hosts["a"]["ok"]
    assert hosts["a"]["concerns"]["tuning"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 0}
    assert hosts["a"]["drifted"] == [{"concern": "tuning", "check": "test_sysctls",
                                      "outcome": "failed", "message": records[0]["message"]}]
    assert hosts["b"]["status"] == "ok" and hosts["b"]["ok"]
    assert hosts["c"]["status"] == "unreachable"
    assert hosts["d"]["status"] == "not-run"
    assert hosts["a"]["duration_s"] == 1.5


def test_group_by_message():
    drifted = [{"concern": "x", "check": f"t{i}", "message": "cannot read the host: refused"}
               for i in range(3)]
    assert checks_cli.group_by_message(drifted) == {
        "cannot read the host: refused": ["x::t0", "x::t1", "x::t2"]}


def test_merge_junit(tmp_path):
    for i in range(2):
        (tmp_path / f"p{i}.xml").write_text(
            f'<testsuites><testsuite name="pytest" tests="1"><testcase name="t{i}"/>'
            "</testsuite></testsuites>")
    out = tmp_path / "out" / "junit.xml"
    checks_cli.merge_junit([tmp_path / "p0.xml", tmp_path / "p1.xml", tmp_path / "gone.xml"], out)
    root = ET.parse(out).getroot()
    assert root.tag == "testsuites"
    assert [c.get("name") for c in root.iter("testcase")] == ["t0", "t1"]


def test_unknown_node_exits_2(site):
    result = CliRunner().invoke(app, ["check", "gpu99", "--site", str(site.path)])
    assert result.exit_code == 2
    assert "unknown node or group 'gpu99'" in result.output


def test_nodes_and_all_exit_2(site):
    result = CliRunner().invoke(app, ["check", "gpu01", "--all", "--site", str(site.path)])
    assert result.exit_code == 2 and "not both" in result.output


def test_invalid_site_exits_2(write_site):
    path = write_site("nodes:\n  gpu01:\n    connection: {adress: x}\n")
    result = CliRunner().invoke(app, ["check", "--site", str(path)])
    assert result.exit_code == 2
    assert "adress" in result.output and "Traceback" not in result.output


def test_missing_key_file_exits_2(write_site, tmp_path):
    path = write_site("nodes:\n  gpu01:\n    connection: {address: 127.0.0.1, key: nokey}\n")
    result = CliRunner().invoke(app, ["check", "--site", str(path)])
    assert result.exit_code == 2 and "connection.key nokey does not exist" in result.output


def test_unreachable_host_reports_and_exits_1(write_site, tmp_path):
    """End to end through pytest and testinfra: a port where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: connecting is refused
    path = write_site(f"nodes:\n  gpu01:\n    os: debian-12\n    connection: "
                      f"{{address: 127.0.0.1, port: {port}, user: root}}\n")
    out, junit = tmp_path / "r.json", tmp_path / "j.xml"
    result = CliRunner().invoke(app, ["check", "--site", str(path), "--json", str(out),
                                      "--junit", str(junit), "-m", "not slow"])
    assert result.exit_code == 1, result.output
    doc = json.loads(out.read_text())
    host = doc["hosts"]["gpu01"]
    assert host["status"] == "unreachable" and not doc["ok"]
    assert "cannot read the host" in host["drifted"][0]["message"]
    assert set(host["concerns"]) >= {"base", "nvidia_driver", "tuning", "vllm"}
    assert ET.parse(junit).getroot().find("testsuite") is not None
