"""Provisioning benchmark against pvesim (the simulated PVE API): prints JSON.

    .venv/bin/python bench/provision.py [--runs 5] [--vms 1,20]

For each VM count: a site with that many GPU VMs on one PVE node, planned with
`gpunode.proxmox.run.provision(dry_run=True)` (login, PCI mapping reads, per-VM config,
status and pending reads, the pure plan) -- the same call `gpunode provision --dry-run`
makes -- for VMs that do not exist yet (create plans) and, after they were provisioned
(created and started in pvesim, without lab VMs behind them), for VMs that exist and match
(no-change plans: a config and a pending read each). Also the wall time of the whole CLI command (Python
start-up included). Target (issue 18): 20 VMs planned in under 2 s. pvesim runs as its own
process on 127.0.0.1 with TLS verified against its CA; figures depend on the host's load
(the 1-minute load average is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from gpunode.inventory import load_site
from gpunode.proxmox import run

TARGET_20_S = 2.0


def write_site(d: Path, pve: Any, token: Any, count: int) -> Path:
    secret = d / "pve.token"
    secret.write_text(token.secret + "\n")
    secret.chmod(0o600)
    nodes: dict[str, Any] = {
        "pve1": {"kind": "pve-host", "os": "debian-12",
                 "connection": {"address": "127.0.0.1", "user": "root"},
                 "pve": {"api": {"url": f"https://{pve.host}:{pve.port}",
                                 "token_id": token.full_id,
                                 "token_secret_file": str(secret),
                                 "verify_tls": str(pve.ca_path)},
                         "pci_mappings": [{"name": "a6000-0", "addresses": ["0000:01:00"]},
                                          {"name": "a6000-1", "addresses": ["0000:41:00"]}]}}}
    for i in range(count):
        nodes[f"bench{i:02d}"] = {
            "kind": "pve-guest", "connection": {"address": "127.0.0.1", "user": "gpunode"},
            "vm": {"pve_node": pve.node, "vmid": 1000 + i, "cloud_image": "local:import/b.qcow2",
                   "cores": 2, "memory_mib": 2048, "disk_gib": 8, "storage": "local-lvm",
                   "hostpci": [{"mapping": f"a6000-{i}"}] if i < 2 else []}}
    path = d / f"site-{count}.yaml"
    path.write_text(yaml.safe_dump({"site": {"name": f"bench-{count}"}, "nodes": nodes}))
    return path


def time_plan(site_path: Path, runs: int) -> dict[str, Any]:
    site = load_site(site_path)
    times, changes = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        report = run.provision(run.endpoints_for(site, None, env={}), dry_run=True)
        times.append(time.perf_counter() - t0)
        if not report.ok:
            raise SystemExit(f"plan failed: {[n.result.error for n in report.nodes]}")
        changes = sum(len(n.plan.changes) for n in report.nodes if n.plan)
    return {"median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4),
            "runs": runs, "planned_changes": changes}


def time_cli(site_path: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXMOX_")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gpunode.cli.main", "provision", "--dry-run",
                           "--site", str(site_path)], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"CLI dry run exit {proc.returncode}: {proc.stderr[-2000:]}")
    return round(elapsed, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--vms", default="1,20")
    args = ap.parse_args()
    from gpunode.lab.pvesim.server import PveSim

    counts = [int(c) for c in args.vms.split(",")]
    out: dict[str, Any] = {"load_avg_1m_start": os.getloadavg()[0], "target_20_vms_s":
                           TARGET_20_S, "plans": {}}
    with tempfile.TemporaryDirectory(prefix="gpunode-bench-prov-") as tmp, \
            PveSim(Path(tmp) / "lab", vms=False) as pve:
        img = Path(tmp) / "b.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
        pve.import_image(img, "b.qcow2")
        token = pve.create_token("bench@pve", "plan", privsep=False,
                                 acl=[("/", "Administrator")])
        for count in counts:
            site_path = write_site(Path(tmp), pve, token, count)
            entry: dict[str, Any] = {"absent": time_plan(site_path, args.runs)}
            t0 = time.perf_counter()
            report = run.provision(run.endpoints_for(load_site(site_path), None, env={}),
                                   wait_agent=False)
            if not report.ok:
                raise SystemExit(f"provision failed: {[n.result.error for n in report.nodes]}")
            entry["provision_s"] = round(time.perf_counter() - t0, 3)
            entry["existing"] = time_plan(site_path, args.runs)
            entry["cli_wall_s"] = time_cli(site_path)
            run.destroy(run.endpoints_for(load_site(site_path), None, env={}))
            out["plans"][str(count)] = entry
        out["pvesim_version"] = getattr(pve, "version", "9")
    out["load_avg_1m_end"] = os.getloadavg()[0]
    if "20" in out["plans"]:
        p20 = out["plans"]["20"]
        out["target_met"] = max(p20["absent"]["median_s"], p20["existing"]["median_s"]) < \
            TARGET_20_S
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
