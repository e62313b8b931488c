"""`make demo`: the main job end to end on the lab (SIMULATED NVIDIA stack).

Boots a Debian 12 lab VM with two simulated RTX A6000s, converges it with `gpunode deploy`
(full stack, one vLLM stand-in service on both GPUs), proves it with `gpunode check`, sends
one chat completion to the served endpoint, prints a summary with timings and tears the VM
down (`--keep` leaves it running)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gpunode.deploy_cli import run_pyinfra
from gpunode.inventory import load_site
from gpunode.lab import labsite
from gpunode.lab.core import Lab
from gpunode.lab.errors import LabError

REPO = Path(__file__).resolve().parents[2]
console = Console()
NODE = "labgpu1"


def chat(vm, port: int, key: str, model: str) -> dict:
    """One chat completion from inside the guest; the key travels on stdin, not argv."""
    body = json.dumps({"model": model, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "Say hello to gpunode."}]})
    rc, out, err = vm.run(
        f"curl -sS --fail-with-body -H @- -H 'Content-Type: application/json' "
        f"--data-binary '{body}' http://127.0.0.1:{port}/v1/chat/completions",
        input=f"Authorization: Bearer {key}\n")
    if rc != 0:
        raise RuntimeError(f"chat completion failed ({rc}): {err or out}")
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the VM running")
    parser.add_argument("--state", default=str(REPO / ".lab" / "demo"), help="lab state dir")
    args = parser.parse_args(argv)
    timings: dict[str, float] = {}
    lab = Lab(Path(args.state))
    ok = False
    started = time.monotonic()

    def step(name: str):
        console.rule(f"[bold]{name}")
        return time.monotonic()

    try:
        t = step("Lab: image, simulated NVIDIA mirrors, VM")
        facts = labsite.prepare_lab(Path(args.state))
        if NODE in lab.names():
            lab.destroy(NODE)  # a VM kept by an earlier demo: start from a fresh one
        vm = lab.up(NODE, cpus=2, memory_mib=3072, numa=2)
        labsite.prepare_guest(vm, models=("/var/lib/vllm/models/tiny-sim",))
        site_path = labsite.write_lab_site(lab, facts, Path(args.state) / "site.yaml")
        timings["lab"] = time.monotonic() - t
        console.print(f"VM {NODE} up at {vm.address}:{vm.ssh_port}; site {site_path}")

        t = step("gpunode deploy")
        rc, results, _ = run_pyinfra(site_path, [NODE])
        timings["deploy"] = time.monotonic() - t
        if rc != 0:
            console.print(f"[red]deploy failed[/red]: {results[NODE].errors}")
            return 1

        t = step("gpunode check")
        rc = subprocess.call([str(Path(sys.executable).with_name("gpunode")), "check",
                              "--site", str(site_path), NODE], cwd=REPO)
        timings["check"] = time.monotonic() - t
        if rc != 0:
            console.print("[red]checks failed[/red]")
            return 1

        t = step("One chat completion")
        profile = load_site(site_path).nodes[NODE]
        svc = profile.vllm.services[0]
        key = Path(svc.api_key_file).read_text().strip()
        answer = chat(vm, svc.port, key, svc.names[0])
        timings["chat"] = time.monotonic() - t
        console.print(f"model {answer.get('model')}: "
                      f"{answer['choices'][0]['message']['content']!r}")
        ok = True
    except (LabError, RuntimeError, OSError) as exc:
        console.print(f"[red]demo failed[/red]: {exc}")
    finally:
        timings["total"] = time.monotonic() - started
        table = Table(title="gpunode demo" + (" (ok)" if ok else " (FAILED)"))
        table.add_column("step")
        table.add_column("seconds", justify="right")
        for name, seconds in timings.items():
            table.add_row(name, f"{seconds:.1f}")
        console.print(table)
        if not args.keep:
            lab.down_all()
            from gpunode.lab.sim import server

            server.stop(Path(args.state))
        else:
            console.print(f"VM left running: gpunode lab ssh {NODE} (state {args.state})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
