"""Selecting VMs and credentials for a run; CLI exit codes for invalid input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpunode.cli.main import app
from gpunode.inventory import load_site
from gpunode.proxmox import run

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "proxmox"
SECRET = "0b7e3c1a-9d2f-4a6b-8c5e-1f0a2b3c4d5e"


def test_endpoints_group_vms_and_collect_the_mappings_they_use():
    site = load_site(FIX / "site.yaml")
    eps = run.endpoints_for(site, None, env={"PROXMOX_TOKEN_SECRET": SECRET})
    assert len(eps) == 1
    ep = eps[0]
    assert ep.label == "pve1" and ep.creds.token_id == "gpunode@pve!provision"
    assert [t.node for t in ep.targets] == ["gpuvm1", "gpuvm2"]
    assert ep.mappings == {"pve1": [("a6000-0", ["0000:01:00"]), ("a6000-1", ["0000:41:00"])]}


def test_a_non_guest_node_is_input_error():
    site = load_site(FIX / "site.yaml")
    with pytest.raises(run.InputProblems, match="kind is pve-host"):
        run.endpoints_for(site, ["pve1"], env={"PROXMOX_TOKEN_SECRET": SECRET})


def raw_site(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(textwrap.dedent("""
        nodes:
          pve9:
            kind: pve-host
            os: debian-12
            connection: {address: 127.0.0.1}
            pve: {}
          vmraw:
            kind: pve-guest
            connection: {address: 127.0.0.1}
            vm:
              pve_node: pve9
              vmid: 300
              template_vmid: 9000
              hostpci:
                - address: "0000:01:00"
    """))
    return path


def test_raw_hostpci_with_a_token_is_refused_before_any_call(tmp_path):
    site = load_site(raw_site(tmp_path))
    env = {"PROXMOX_HOST": "127.0.0.1:1", "PROXMOX_TOKEN_ID": "ci@pve!x",
           "PROXMOX_TOKEN_SECRET": SECRET}
    with pytest.raises(run.InputProblems) as exc:
        run.endpoints_for(site, None, env=env)
    assert "root@pam with a password" in str(exc.value) and "hostpci[0].address" in str(
        exc.value)
    assert SECRET not in str(exc.value)
    # root@pam with a password may
    env = {"PROXMOX_HOST": "127.0.0.1:1", "PROXMOX_USER": "root@pam",
           "PROXMOX_PASSWORD": SECRET}
    assert run.endpoints_for(site, None, env=env)[0].creds.is_root_password


def test_cli_input_errors_exit_2(tmp_path, monkeypatch):
    for var in ("PROXMOX_HOST", "PROXMOX_USER", "PROXMOX_TOKEN_ID", "PROXMOX_TOKEN_SECRET",
                "PROXMOX_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    site = str(FIX / "site.yaml")
    res = runner.invoke(app, ["provision", "--site", site, "--dry-run"])
    assert res.exit_code == 2 and "secret file /nonexistent/pve1.token" in res.output
    res = runner.invoke(app, ["provision", "nosuchnode", "--site", site])
    assert res.exit_code == 2 and "unknown node or group 'nosuchnode'" in res.output
    res = runner.invoke(app, ["destroy", "vmraw", "--site", str(raw_site(tmp_path))])
    assert res.exit_code == 2 and "no Proxmox API address" in res.output


def test_cli_unreachable_pve_exits_1_naming_the_host(monkeypatch):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PROXMOX_TOKEN_SECRET", SECRET)
    site = load_site(FIX / "site.yaml")
    eps = run.endpoints_for(site, ["gpuvm1"])
    eps[0].creds = type(eps[0].creds)(**{**eps[0].creds.__dict__, "host": "127.0.0.1",
                                         "port": port})
    report = run.provision(eps, dry_run=True)
    assert not report.ok
    assert f"https://127.0.0.1:{port}" in report.nodes[0].result.error
    assert SECRET not in str(report.to_json())


def test_addresses_are_recorded_and_forgotten(tmp_path):
    site_path = tmp_path / "site.yaml"
    site_path.write_text("nodes: {}\n")
    from gpunode.proxmox.apply import VmResult
    from gpunode.proxmox.plan import VmPlan
    rep = run.Report(nodes=[run.NodeReport("vm1", 201, VmPlan("vm1", None),
                                           VmResult("vm1", 201, address="192.0.2.7"))])
    path = run.record_addresses(site_path, rep)
    assert path == tmp_path / ".gpunode" / "addresses.json"
    assert run.recorded_address(site_path, "vm1") == "192.0.2.7"
    gone = run.Report(nodes=[run.NodeReport("vm1", 201, None, VmResult("vm1", 201))])
    run.record_addresses(site_path, gone)
    assert run.recorded_address(site_path, "vm1") is None


def test_auto_address_comes_from_the_last_provision(tmp_path):
    site_path = tmp_path / "site.yaml"
    site_path.write_text(textwrap.dedent("""
        nodes:
          pve1:
            kind: pve-host
            os: debian-12
            connection: {address: 127.0.0.1}
            pve: {}
          vm1:
            kind: pve-guest
            connection: {address: auto, user: gpunode}
            vm: {pve_node: pve1, vmid: 201, template_vmid: 9000}
          vm2:
            kind: pve-guest
            connection: {address: auto}
            vm: {pve_node: pve1, vmid: 202, template_vmid: 9000}
          metal:
            connection: {address: 192.0.2.9}
    """))
    from gpunode.proxmox.apply import VmResult
    from gpunode.proxmox.plan import VmPlan
    rep = run.Report(nodes=[run.NodeReport("vm1", 201, VmPlan("vm1", None),
                                           VmResult("vm1", 201, address="192.0.2.41"))])
    run.record_addresses(site_path, rep)
    site = load_site(site_path)
    missing = run.use_recorded_addresses(site)
    assert site.nodes["vm1"].connection.address == "192.0.2.41"
    assert site.nodes["vm1"].connection.user == "gpunode"
    assert site.nodes["metal"].connection.address == "192.0.2.9"
    assert len(missing) == 1 and "nodes.vm2.connection.address is auto" in missing[0]
