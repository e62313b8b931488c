"""`python -m gpunode.lab.pvesim serve ...`: the pvesim server process (SIMULATION)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpunode.lab.pvesim.server import serve


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m gpunode.lab.pvesim")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the simulated PVE API on 127.0.0.1")
    s.add_argument("--lab-dir", type=Path, required=True)
    s.add_argument("--version", choices=["9", "8.4"], default="9")
    s.add_argument("--gpus", type=int, choices=[2, 4], default=2)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--vms", action="store_true", help="back VMs with lab VMs (qemu)")
    s.add_argument("--auth-fail-delay", type=float, default=3.0,
                   help="seconds before a 401 answer (PVE: 3)")
    s.add_argument("--tie-to-parent", action="store_true",
                   help="exit when the parent process dies (test sessions)")
    a = ap.parse_args()
    serve(a.lab_dir, a.version, a.gpus, a.port, a.vms, a.tie_to_parent, a.auth_fail_delay)


if __name__ == "__main__":
    main()
