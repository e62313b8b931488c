"""SIMULATION: `python -m gpunode.lab.sim {prepare,start,stop,status}`.

prepare  build (cached) the simulated apt repositories and the guest Python index, print
         the facts for the lab site file as JSON
start    prepare, then serve the www root on 127.0.0.1:<port> in the background
stop     stop the background server
status   print the background server's record (or nothing)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpunode.lab.errors import LabError


def main(argv: list[str] | None = None) -> int:
    from gpunode.lab.sim import prepare, server

    parser = argparse.ArgumentParser(prog="python -m gpunode.lab.sim",
                                     description="SIMULATION: lab NVIDIA repos and index.")
    parser.add_argument("command", choices=("prepare", "start", "stop", "status"))
    parser.add_argument("--www", type=Path, default=None, help="www root")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 18087)")
    parser.add_argument("--state-dir", type=Path, default=None, help="lab state dir")
    parser.add_argument("--no-python-index", action="store_true",
                        help="build only the apt repositories (no PyPI downloads)")
    args = parser.parse_args(argv)
    try:
        if args.command in ("prepare", "start"):
            facts = prepare(args.www, port=args.port, python_index=not args.no_python_index)
            if args.command == "start":
                facts["server"] = server.start(facts["www_root"], args.port, args.state_dir)
            print(json.dumps(facts, indent=2, sort_keys=True))
        elif args.command == "stop":
            print("stopped" if server.stop(args.state_dir) else "not running")
        else:
            info = server.status(args.state_dir)
            if info:
                print(json.dumps(info, indent=2, sort_keys=True))
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
