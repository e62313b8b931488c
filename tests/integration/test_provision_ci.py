"""The users' CI example (examples/ci/gpu-vm-pipeline.yml) run step by step against
pvesim, the way a runner does: each `run:` step in order with the workflow's env; after a
failure only `if: always()` steps run. pvesim runs without lab VMs here, so the VM never
answers through its guest agent: provision fails, and the destroy step must still remove
the VM (the pipeline's promise: no throwaway VM left behind). The full success path with
a booted VM is test_provision_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "examples" / "ci" / "gpu-vm-pipeline.yml"


@pytest.fixture
def pve(tmp_path: Path) -> Any:
    from gpunode.lab.pvesim.server import PveSim

    with PveSim(tmp_path / "lab", vms=False) as sim:
        img = tmp_path / "cloud.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
        sim.import_image(img, "debian-12.qcow2")
        yield sim


def run_workflow(env: dict[str, str], cwd: Path) -> list[tuple[str, int | None]]:
    """(step name, exit code or None when skipped) for every step of the job."""
    doc = yaml.safe_load(WORKFLOW.read_text())
    job = next(iter(doc["jobs"].values()))
    env = env | {k: str(v) for k, v in job.get("env", {}).items()
                 if not str(v).startswith("${{")} | env
    failed = False
    out: list[tuple[str, int | None]] = []
    for step in job["steps"]:
        name = step.get("name", step.get("uses", "?"))
        always = str(step.get("if", "")).strip() == "always()"
        if "run" not in step or name == "Install gpunode" or (failed and not always):
            out.append((name, None))
            continue
        proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        print(f"--- {name}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        out.append((name, proc.returncode))
        failed = failed or proc.returncode != 0
    return out


def test_pipeline_destroys_the_vm_even_when_a_step_fails(pve, tmp_path):
    tok = pve.create_token("runner@pve", "ci", privsep=True,
                           acl=[("/vms", "PVEVMAdmin"), ("/mapping/pci", "PVEMappingAdmin"),
                                ("/storage", "PVEDatastoreUser"), ("/", "PVEAuditor")])
    work = tmp_path / "checkout"
    (work / "inventory").mkdir(parents=True)
    site = {"site": {"name": "ci"}, "nodes": {
        "pve1": {"kind": "pve-host", "os": "debian-12",
                 "connection": {"address": "127.0.0.1", "user": "root"},
                 "pve": {"api": {"url": f"https://{pve.host}:{pve.port}",
                                 "token_id": tok.full_id,
                                 "token_secret_file": "/nonexistent/ci-uses-the-env",
                                 "verify_tls": str(pve.ca_path)},
                         "pci_mappings": [{"name": "a6000-0", "addresses": ["0000:01:00"]}]}},
        "ci-gpu01": {"kind": "pve-guest", "connection": {"address": "127.0.0.1"},
                     "vm": {"pve_node": pve.node, "vmid": 301,
                            "cloud_image": "local:import/debian-12.qcow2", "cores": 2,
                            "memory_mib": 2048, "disk_gib": 8, "agent_timeout_s": 30,
                            "hostpci": [{"mapping": "a6000-0"}]}}}}
    (work / "inventory" / "site.yaml").write_text(yaml.safe_dump(site))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXMOX_")}
    env |= {"PROXMOX_TOKEN_SECRET": tok.secret,
            "GPUNODE": f"{sys.executable} -m gpunode.cli.main", "COLUMNS": "160"}
    steps = dict(run_workflow(env, work))
    assert steps["Validate the site"] == 0 and steps["Plan (dry run)"] == 0
    assert steps["Remove a VM left by an earlier run"] == 0
    assert steps["Provision the VM"] == 1        # no guest agent behind pvesim's VM here
    assert steps["Deploy"] is None and steps["Checks"] is None
    assert steps["Destroy the VM"] == 0
    vms = [int(r["vmid"]) for r in pve.api().nodes(pve.node).qemu.get()]
    assert 301 not in vms
    report = work / "reports" / "provision.json"
    assert report.is_file() and tok.secret not in report.read_text()
