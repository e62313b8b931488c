#!/usr/bin/env python3
"""Benchmark: converge a fresh lab VM with `gpunode deploy` (pyinfra), then re-run it as a
no-op. Prints JSON: wall times, changed operations, and remote commands per run (counted
from pyinfra's -vv output). Not a test: targets live here, not in timed tests.

    .venv/bin/python bench/converge.py [--keep] [--state DIR]
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

from gpunode.lab import labsite  # noqa: E402
from gpunode.lab.core import Lab  # noqa: E402

TARGET_NOOP_S = 10.0


def pyinfra_run(site: Path, root: Path = REPO) -> dict:
    """`root`: the tree whose entry files and code run (another revision's worktree)."""
    env = {**os.environ, "GPUNODE_SITE": str(site), "PYTHONUNBUFFERED": "1"}
    if root != REPO:
        env["PYTHONPATH"] = str(root / "src")
    cmd = [str(REPO / ".venv/bin/pyinfra"), "-y", "-vv",
           "inventory/pyinfra_inventory.py", "deploy/gpu_node.py"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    return {
        "rc": proc.returncode,
        "seconds": round(seconds, 2),
        "changed_operations": len(re.findall(r"^\s*\[[^\]]+\] Success", out, re.M)),
        "unchanged_operations": len(re.findall(r"^\s*\[[^\]]+\] No changes", out, re.M)),
        "remote_commands": len(re.findall(r"^\s*\[[^\]]+\] >>> ", out, re.M)),
        "tail": out.splitlines()[-5:] if proc.returncode else [],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the VM running")
    parser.add_argument("--state", help="lab state dir (default: a temporary one)")
    args = parser.parse_args()
    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="gpunode-bench-"))
    lab = Lab(state)
    result: dict = {"benchmark": "converge", "engine": "pyinfra", "accel": None}
    try:
        facts = labsite.prepare_lab(state)
        t = time.monotonic()
        vm = lab.up("benchgpu", cpus=2, memory_mib=3072, numa=2)
        result["boot_s"] = round(time.monotonic() - t, 2)
        labsite.prepare_guest(vm, models=("/var/lib/vllm/models/tiny-sim",))
        site = labsite.write_lab_site(lab, facts, state / "site.yaml")
        result["fresh"] = pyinfra_run(site)
        result["noop"] = pyinfra_run(site)
        result["noop_target_s"] = TARGET_NOOP_S
        result["noop_within_target"] = result["noop"]["seconds"] <= TARGET_NOOP_S
    finally:
        if not args.keep:
            lab.down_all()
            from gpunode.lab.sim import server

            server.stop(state)
            if not args.state:
                shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0 if result.get("noop", {}).get("rc") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
