#!/usr/bin/env python3
"""Benchmark: both engines on fresh lab VMs (SIMULATED NVIDIA stack): fresh deploy and
no-op re-run with pyinfra (`gpunode deploy`) and with Ansible (`playbooks/gpu_node.yml`),
their ratio, and the Ansible speed work before/after on the converged VM. Prints JSON.
The VMs run one after the other (CPU is scarce). Not a test.

    .venv/bin/python bench/converge_ansible.py [--keep] [--state DIR] [--skip-pyinfra]
    .venv/bin/python bench/converge_ansible.py --converged SITE --limit NODE
        (no-op figures only, on a node Ansible already converged)
    .venv/bin/python bench/converge_ansible.py --state DIR --noop-only [--baseline REV]
        (no-op figures only, on the VMs a kept earlier run of this benchmark converged in DIR:
        floor, then each engine's no-op best of 3; with --baseline, the no-ops of git
        revision REV, run from a temporary worktree, on the same VMs in the same run, so the
        two ratios over the floor compare code, not machine load)

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


def ansible_run(site: Path, *extra: str, env_extra: dict[str, str] | None = None,
                root: Path = REPO) -> dict:
    env = {**ansible_env(site), "ANSIBLE_NOCOLOR": "1", **(env_extra or {})}
    if root != REPO:  # a baseline worktree: its own configuration and code
        env.update(ANSIBLE_CONFIG=str(root / "ansible.cfg"), PYTHONPATH=str(root / "src"))
    cmd = [str(REPO / ".venv/bin/ansible-playbook"), "playbooks/gpu_node.yml", *extra]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    out = proc.stdout + proc.stderr
    m = RECAP.search(out)
    counts = {k: int(v) for k, v in m.groupdict().items() if k != "host"} if m else {}
    # a run that played no host (an inventory the code cannot read) is no measurement
    return {"rc": proc.returncode or (0 if m else 1), "seconds": round(seconds, 2),
            "changed_tasks": counts.get("changed"), "ok_tasks": counts.get("ok"),
            "skipped_tasks": counts.get("skipped"),
            "tail": out.splitlines()[-8:] if proc.returncode else []}


def floor(vm, site: Path, runs: int = 3, root: Path = REPO) -> dict:
    """The floor a no-op is compared with: the same facts (the snapshot script on the node's
    spec, as the code of `root` builds it) read by one SSH command on a new connection (no
    control master), best of `runs`."""
    code = ("import sys; from gpunode.facts import snapshot_command\n"
            "try: from gpunode.facts import node_spec\n"
            "except ImportError: from gpunode.ansible_plan import spec as node_spec\n"
            "from gpunode.inventory.loader import load_site; "
            "(p,) = load_site(sys.argv[1]).select([sys.argv[2]]); "
            "print(snapshot_command(node_spec(p)))")
    proc = subprocess.run([sys.executable, "-c", code, str(site), vm.name], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root / "src")})
    if proc.returncode:
        return {"rc": proc.returncode, "tail": proc.stderr.splitlines()[-4:]}
    argv = [*vm.ssh_argv(proc.stdout.rstrip("\n"))]
    argv[1:1] = ["-o", "ControlPath=none"]
    times = []
    for _ in range(runs):
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.monotonic() - started)
        if proc.returncode:
            return {"rc": proc.returncode, "tail": proc.stderr.splitlines()[-4:]}
    return {"rc": 0, "seconds": round(min(times), 2), "runs": [round(t, 2) for t in times]}


UNKNOWN_KEY = re.compile(r"(?P<path>[\w.\[\]-]+): unknown key '(?P<key>[^']+)'")


def baseline_site(site: Path, root: Path) -> Path:
    """`site` without the keys the baseline revision does not know yet (each named by that
    revision's own `gpunode validate`), so the older code can run on the same VM."""
    import yaml

    doc = yaml.safe_load(site.read_text())
    out = site.with_name(f"baseline-{site.name}")
    for _ in range(20):
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        proc = subprocess.run([sys.executable, "-m", "gpunode.cli", "validate", "--site",
                               str(out)], capture_output=True, text=True, cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root / "src")})
        found = [m.group("path").split(".") for m in UNKNOWN_KEY.finditer(proc.stdout
                                                                          + proc.stderr)]
        if not found:
            return out
        for path in found:
            node = doc
            for part in path[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            node.pop(path[-1], None)
    return out


def with_floor_ratio(run: dict, base: dict) -> dict:
    if run.get("rc") == 0 and base.get("rc") == 0:
        run["over_floor"] = round(run["seconds"] / max(base["seconds"], 0.01), 2)
    return run


def pyinfra_run(site: Path, root: Path = REPO) -> dict:
    if root != REPO:  # a baseline worktree: its entry files and code
        from converge import pyinfra_run as run

        return run(site, root)
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


def changed(run: dict) -> int | None:
    return run.get("changed_operations", run.get("changed_tasks"))


def best_of(run, *args, n: int = 3, **kwargs) -> dict:
    """The fastest of `n` runs (each run's seconds kept); stops at the first failure."""
    runs = []
    for _ in range(n):
        runs.append(run(*args, **kwargs))
        if runs[-1].get("rc"):
            return runs[-1]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "runs": [r["seconds"] for r in runs]}


def noop_only(lab: Lab, facts: dict, state: Path, baseline: str | None) -> dict:
    """Floor and no-op figures on VMs an earlier kept run converged (benchpy, benchansible):
    a settling run first (what changed since that run's code is applied and reported), then
    floor and best-of-3 no-ops, and the baseline revision's no-ops on the same VMs."""
    result: dict = {"benchmark": "converge", "mode": "noop-only", "engines": {}}
    wt = None
    if baseline:
        wt = Path(tempfile.mkdtemp(prefix="gpunode-baseline-")) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(wt), baseline],
                       cwd=REPO, check=True)
        (wt / ".venv").symlink_to(REPO / ".venv")
        result["baseline"] = subprocess.run(["git", "rev-parse", "--short", baseline], cwd=REPO,
                                            capture_output=True, text=True).stdout.strip()
    try:
        for engine, name, run in (("pyinfra", "benchpy", pyinfra_run),
                                  ("ansible", "benchansible", ansible_run)):
            if not (lab.vm_dir(name) / "vm.json").is_file():
                result["engines"][engine] = {"skipped": f"no converged VM {name} in {state}"}
                continue
            site, boot, vm = vm_site(lab, facts, name, state)
            settle = run(site)
            base = floor(vm, site)
            row = {"engine": engine, "boot_s": boot,
                   "settle_changed": changed(settle),
                   "floor": base, "noop": with_floor_ratio(best_of(run, site), base)}
            if wt:
                # the baseline first converges the VM to what it wants (it may write its own
                # version of some file), then its no-ops are timed against its own floor
                old_site = baseline_site(site, wt)
                row["baseline_settle_changed"] = changed(run(old_site, root=wt))
                row["baseline_floor"] = floor(vm, old_site, root=wt)
                row["baseline_noop"] = with_floor_ratio(best_of(run, old_site, root=wt),
                                                        row["baseline_floor"])
                if "over_floor" in row["noop"] and "over_floor" in row["baseline_noop"]:
                    row["ratio_over_baseline"] = round(
                        row["noop"]["over_floor"] / row["baseline_noop"]["over_floor"], 3)
                # the baseline may have written its own version of a file: converge back
                row["resettle_changed"] = changed(run(site))
            result["engines"][engine] = row
            lab.down(name)
    finally:
        if wt:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=REPO)
    return result


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
    parser.add_argument("--noop-only", action="store_true",
                        help="no-op figures on the VMs a kept run converged in --state")
    parser.add_argument("--baseline", help="with --noop-only: also time this git revision")
    args = parser.parse_args()
    if args.noop_only and not args.state:
        parser.error("--noop-only needs --state (the directory of a kept run)")
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
        if args.noop_only:
            result = noop_only(lab, facts, state, args.baseline)
            print(json.dumps(result, indent=2))
            return 0 if all(e.get("noop", {}).get("rc") == 0
                            for e in result["engines"].values()) else 1
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
