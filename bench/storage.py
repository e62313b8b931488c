#!/usr/bin/env python3
"""Benchmark: a cold model load from the model store on a lab VM, with the disk at the
kernel's defaults and with gpunode's settings (tuning.block_io: I/O scheduler and
read-ahead). Prints JSON. Not a test.

    .venv/bin/python bench/storage.py [--mib 1024] [--state DIR] [--vm NAME] [--keep]

A synthetic checkpoint shard of random bytes (`--mib`) is written under the vLLM model
directory, then read cold (page cache dropped before each run) in the two ways loaders
read weights: through mmap, touching each page in order (safetensors), and with read() in
16 MiB chunks. Each setting runs 3 times; the best run counts. The settings are written to
sysfs directly: the same values gpunode's udev rules write (desired.block_wanted).

What it measures here: a lab VM under TCG whose virtio disk is a qcow2 file the host's page
cache holds, so a run is the guest's block path (request count and size, scheduler) more
than a disk. On a real NVMe or SATA drive the read-ahead effect is larger; rerun it there.
Without --vm a fresh lab VM boots from the Debian 12 base image (no deploy needed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gpunode.core import desired  # noqa: E402
from gpunode.lab.core import Lab  # noqa: E402
from gpunode.model import NodeProfile  # noqa: E402

SHARD = "/var/lib/vllm/models/bench-storage/model-00001-of-00001.safetensors"
PATTERNS = {
    "mmap": ("import mmap,sys\n"
             "f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n"
             "s=0\n"
             "for i in range(0,len(m),4096): s+=m[i]\n"
             "print(s)"),
    "read_16m": ("import sys\n"
                 "f=open(sys.argv[1],'rb',buffering=0); n=0\n"
                 "while True:\n"
                 "    b=f.read(16<<20)\n"
                 "    if not b: break\n"
                 "    n+=len(b)\n"
                 "print(n)"),
}


def root(vm, command: str, timeout: float = 300) -> str:
    return vm.check("sudo sh -c " + shlex.quote(command), timeout=timeout)


def disk_of(vm, path: str) -> str:
    source = vm.check(f"findmnt -no SOURCE --target {path}").strip()
    parent = vm.check(f"lsblk -no PKNAME {source}").strip()
    return parent or Path(source).name


def settings(vm, dev: str) -> dict:
    words = vm.check(f"cat /sys/block/{dev}/queue/scheduler").split()
    return {"scheduler": next(w.strip("[]") for w in words if w.startswith("[")),
            "read_ahead_kb": int(vm.check(f"cat /sys/block/{dev}/queue/read_ahead_kb"))}


def apply(vm, dev: str, scheduler: str, read_ahead_kb: int) -> None:
    root(vm, f"echo {scheduler} > /sys/block/{dev}/queue/scheduler && "
             f"echo {read_ahead_kb} > /sys/block/{dev}/queue/read_ahead_kb")


def cold_runs(vm, pattern: str, runs: int = 3) -> dict:
    times = []
    for _ in range(runs):
        root(vm, "sync && echo 3 > /proc/sys/vm/drop_caches")
        started = time.monotonic()
        out = vm.check(f"python3 -c {shlex.quote(PATTERNS[pattern])} {SHARD}", timeout=1800)
        times.append(round(time.monotonic() - started, 2))
        if not out.strip():
            raise RuntimeError(f"{pattern}: no output")
    return {"seconds": min(times), "runs": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="shard size in MiB (default 1024)")
    ap.add_argument("--state", help="lab state dir (default: a temporary one)")
    ap.add_argument("--vm", help="an existing VM of that lab to use (else a fresh one)")
    ap.add_argument("--keep", action="store_true", help="leave the VM running")
    args = ap.parse_args()
    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="gpunode-bench-"))
    lab = Lab(state)
    name = args.vm or "benchstore"
    result: dict = {"benchmark": "storage", "shard_mib": args.mib}
    try:
        started = time.monotonic()
        vm = lab.up(name, cpus=2, memory_mib=2048, numa=1, disk_gib=8)
        result["boot_s"] = round(time.monotonic() - started, 1)
        vm.run("cloud-init status --wait >/dev/null 2>&1", timeout=900)
        root(vm, f"install -d -m 755 {Path(SHARD).parent} && "
             f"dd if=/dev/urandom of={SHARD} bs=16M count={max(1, args.mib // 16)} "
             f"status=none && chmod 644 {SHARD} && sync", timeout=1800)
        dev = disk_of(vm, SHARD)
        default = settings(vm, dev)
        scheduler, read_ahead = desired.block_wanted(
            NodeProfile.model_validate({"name": "bench", "connection": {"address": "127.0.0.1"}}),
            dev) or (default["scheduler"], default["read_ahead_kb"])
        result.update(device=dev, default={**default}, tuned={"scheduler": scheduler,
                                                             "read_ahead_kb": read_ahead})
        for pattern in PATTERNS:
            apply(vm, dev, default["scheduler"], default["read_ahead_kb"])
            result["default"][pattern] = cold_runs(vm, pattern)
            apply(vm, dev, scheduler, read_ahead)
            result["tuned"][pattern] = cold_runs(vm, pattern)
            result.setdefault("default_over_tuned", {})[pattern] = round(
                result["default"][pattern]["seconds"]
                / max(result["tuned"][pattern]["seconds"], 0.01), 2)
        apply(vm, dev, default["scheduler"], default["read_ahead_kb"])
        root(vm, f"rm -f {SHARD}")
    finally:
        if not args.keep:
            if not args.vm:
                lab.destroy(name)
            else:
                lab.down(name)
            if not args.state:
                shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
