#!/usr/bin/env python3
"""Benchmark: both engines on fresh lab VMs (SIMULATED NVIDIA stack): fresh deploy and
no-op re-run with pyinfra (`gpunode deploy`) and with Ansible (`playbooks/gpu_node.yml`),
their ratio, and the Ansible speed work before/after on the converged VM. Prints JSON.
The VMs run one after the other (CPU is scarce). Not a test.

    .venv/bin/python bench/converge_ansible.py [--keep] [--state DIR] [--skip-pyinfra]
    .venv/bin/python bench/converge_ansible.py --converged SITE --limit NODE
        (no-op figures only, on a node Ansible already converged)

Ansible configurations compared on the converged VM (no-op runs):
- before: no pipelining, and every template task runs and compares on the host
  (gpunode_facts_skip_unchanged=false) -- what a plain role does;
- pipelining only;
- after (default config): pipelining, and template tasks skipped for files the one
  snapshot shows identical to gpunode's rendering.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from gpunode.cli.deploy import ansible_env  # noqa: E402
from gpunode.lab import labsite  # noqa: E402
from gpunode.lab.core import Lab  # noqa: E402

RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
                   r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)\s+"
                   r"skipped=(?P<skipped>\d+)", re.M)


def speed_work(site: Path, *limit: str) -> dict:
    """No-op runs on a converged node: before/after the Ansible speed work."""
    return {
        "before": ansible_run(site, *limit, "-e", "gpunode_facts_skip_unchanged=false",
                              env_extra={"ANSIBLE_PIPELINING": "False"}),
        "pipelining_only": ansible_run(site, *limit, "-e", "gpunode_facts_skip_unchanged=false"),
        "after": ansible_run(site, *limit),
        "check_diff": ansible_run(site, *limit, "--check", "--diff"),
    }


def ansible_run(site: Path, *extra: str, env_extra: dict[str, str] | None = None) -> dict:
    env = {**ansible_env(site), "ANSIBLE_NOCOLOR": "1", **(env_extra or {})}
    cmd = [str(REPO / ".venv/bin/ansible-playbook"), "playbooks/gpu_node.yml", *extra]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    out = proc.stdout + proc.stderr
    m = RECAP.search(out)
    counts = {k: int(v) for k, v in m.groupdict().items() if k != "host"} if m else {}
    return {"rc": proc.returncode, "seconds": round(seconds, 2),
            "changed_tasks": counts.get("changed"), "ok_tasks": counts.get("ok"),
            "skipped_tasks": counts.get("skipped"),
            "tail": out.splitlines()[-8:] if proc.returncode else []}


def floor(vm, site: Path, runs: int = 3) -> dict:
    """The floor a no-op is compared with: the same facts (the snapshot script on the node's
    spec) read by one SSH command on a new connection (no control master), best of `runs`."""
    from gpunode.facts import node_spec, snapshot_command
    from gpunode.inventory.loader import load_site

    (p,) = load_site(site).select([vm.name])
    argv = [*vm.ssh_argv(snapshot_command(node_spec(p)))]
    argv[1:1] = ["-o", "ControlPath=none"]
    times = []
    for _ in range(runs):
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.monotonic() - started)
        if proc.returncode:
            return {"rc": proc.returncode, "tail": proc.stderr.splitlines()[-4:]}
    return {"rc": 0, "seconds": round(min(times), 2), "runs": [round(t, 2) for t in times]}


def with_floor_ratio(run: dict, base: dict) -> dict:
    if run.get("rc") == 0 and base.get("rc") == 0:
        run["over_floor"] = round(run["seconds"] / max(base["seconds"], 0.01), 2)
    return run


def pyinfra_run(site: Path) -> dict:
    try:
        from converge import pyinfra_run as run  # the lead's pyinfra benchmark, same shape
    except ImportError:
        env = {**os.environ, "GPUNODE_SITE": str(site)}
        started = time.monotonic()
        proc = subprocess.run([str(REPO / ".venv/bin/pyinfra"), "-y", "--no-wait",
                               "inventory/pyinfra_inventory.py", "deploy/gpu_node.py"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        return {"rc": proc.returncode, "seconds": round(time.monotonic() - started, 2)}
    return run(site)


def vm_site(lab: Lab, facts: dict, name: str, state: Path):
    """A fresh lab VM ready for a deploy: (its site file, boot seconds, the VM)."""
    started = time.monotonic()
    vm = lab.up(name, cpus=2, memory_mib=3072, numa=2)
    boot = time.monotonic() - started
    labsite.prepare_guest(vm, models=("/var/lib/vllm/models/tiny-sim",))
    return labsite.write_lab_site(lab, facts, state / f"site-{name}.yaml"), round(boot, 2), vm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the VMs running")
    parser.add_argument("--state", help="lab state dir (default: a temporary one)")
    parser.add_argument("--skip-pyinfra", action="store_true", help="Ansible figures only")
    parser.add_argument("--converged", help="site file of a node Ansible converged")
    parser.add_argument("--limit", help="that node (with --converged)")
    args = parser.parse_args()
    if args.converged:
        limit = ("--limit", args.limit) if args.limit else ()
        out = {"benchmark": "converge", "ansible_speed_work":
               speed_work(Path(args.converged).resolve(), *limit)}
        print(json.dumps(out, indent=2))
        return 0 if out["ansible_speed_work"]["after"]["rc"] == 0 else 1
    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="gpunode-bench-"))
    lab = Lab(state)
    result: dict = {"benchmark": "converge", "engines": {}}
    try:
        facts = labsite.prepare_lab(state)
        if not args.skip_pyinfra:
            site, boot, vm = vm_site(lab, facts, "benchpy", state)
            fresh = pyinfra_run(site)
            base = floor(vm, site)
            result["engines"]["pyinfra"] = {"engine": "pyinfra", "boot_s": boot,
                                            "fresh": fresh, "floor": base,
                                            "noop": with_floor_ratio(pyinfra_run(site), base)}
            lab.down("benchpy")
        site, boot, vm = vm_site(lab, facts, "benchansible", state)
        fresh = ansible_run(site)
        base = floor(vm, site)
        noop = with_floor_ratio(ansible_run(site), base)
        result["engines"]["ansible"] = {"engine": "ansible", "boot_s": boot, "fresh": fresh,
                                        "floor": base, "noop": noop}
        result["ansible_speed_work"] = speed_work(site)
        py = result["engines"].get("pyinfra")
        if py and py["fresh"].get("rc") == 0 and fresh["rc"] == 0:
            result["ratio_ansible_over_pyinfra"] = {
                run: round(result["engines"]["ansible"][run]["seconds"]
                           / max(py[run]["seconds"], 0.01), 2) for run in ("fresh", "noop")}
    finally:
        if not args.keep:
            lab.down_all()
            from gpunode.lab.sim import server

            server.stop(state)
            if not args.state:
                shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(result, indent=2))
    ok = result["engines"].get("ansible", {}).get("noop", {}).get("rc") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
