"""Lab benchmark: prints JSON with the lab's figures on this machine.

    .venv/bin/python bench/lab.py [--cold] [--keep]

- cold_build_s: building the base image from scratch (only with --cold; it rebuilds the
  image; the debootstrap package cache in ~/.cache/gpunode/lab/debs is reported, not wiped)
- cached_image_ready_s: `ensure_image()` when the image exists
- boot_to_ssh_s: `up()` of a new VM (overlay, seed, qemu, OVMF, GRUB, kernel, cloud-init)
  until SSH with the lab key answers
- two_vms: two 2 GiB VMs running at once (both answer SSH), with their boot times
Targets (issue 3): cold build <= 240 s, cached <= 10 s, boot to SSH <= 30 s, two VMs.
Timings depend on what else runs on the host; the 1-minute load average is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gpunode.lab import image, paths, qemu
from gpunode.lab.core import Lab
from gpunode.lab.errors import LabError

TARGETS = {"cold_build_s": 240, "cached_image_ready_s": 10, "boot_to_ssh_s": 30}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="rebuild the base image and time it")
    ap.add_argument("--keep", action="store_true", help="keep the bench lab directory")
    args = ap.parse_args()
    result: dict[str, Any] = {"load_avg_1m_start": os.getloadavg()[0],
                              "cpus": os.cpu_count(), "targets": TARGETS}
    if args.cold:
        debs = paths.cache_root() / "debs"
        result["deb_cache_present"] = debs.is_dir() and any(debs.glob("*.deb"))
        t = time.monotonic()
        image.ensure_image(rebuild=True)
        result["cold_build_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    img = image.ensure_image()
    result["cached_image_ready_s"] = round(time.monotonic() - t, 3)
    result["image"] = str(img)
    result["image_mib"] = round(img.stat().st_size / 2**20)
    result["accel"] = qemu.probe_accel()

    state = Path(tempfile.mkdtemp(prefix="gpunode-lab-bench-"))
    lab = Lab(state, tie_to_parent=True)
    try:
        t = time.monotonic()
        lab.up("bench1", memory_mib=2048)
        result["boot_to_ssh_s"] = round(time.monotonic() - t, 1)
        lab.down("bench1")

        times: dict[str, float] = {}
        errors: list[str] = []

        # qemu dies with the thread that started it (tie_to_parent): start both here,
        # wait for their SSH in parallel.
        t0 = time.monotonic()
        for name in ("bench2", "bench3"):
            lab.up(name, memory_mib=2048, wait=False)

        def boot(name: str) -> None:
            try:
                lab.wait_ssh(name)
                times[name] = round(time.monotonic() - t0, 1)
            except LabError as exc:
                errors.append(f"{name}: {exc}")

        threads = [threading.Thread(target=boot, args=(n,)) for n in ("bench2", "bench3")]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        both = not errors and all(lab.vm(n).run("true")[0] == 0 for n in ("bench2", "bench3"))
        result["two_vms"] = {"both_running": both, "memory_mib_each": 2048,
                             "boot_to_ssh_s": times, "errors": errors}
    finally:
        lab.down_all()
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    result["meets_targets"] = {k: result[k] <= v for k, v in TARGETS.items() if k in result}
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
