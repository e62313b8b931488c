"""`gpunode provision | destroy | rebuild`: Proxmox GPU VMs from the site file.

Exit codes: 0 ok, 1 a VM (or the deploy/checks of a rebuild) failed, 2 invalid input
(nothing was contacted)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from gpunode.cli import SiteOpt, fail_input, output
from gpunode.inventory import Site, SiteError, load_site
from gpunode.proxmox import run
from gpunode.proxmox.plan import Change

err = output.console(stderr=True)
out = output.console()

NodesArg = Annotated[list[str] | None, typer.Argument(help="pve-guest nodes or groups "
                                                      "(default: every pve-guest node).")]
JsonOpt = Annotated[str | None, typer.Option("--json", help="Write the report as JSON to "
                                             "this file ('-' for stdout).")]


def _open(site: str | None, names: list[str] | None) -> tuple[Site, list[run.Endpoint]]:
    from gpunode.core.lock import locked_site

    try:
        # a lock that disagrees with the site stops here, before `rebuild` destroys anything
        loaded = locked_site(load_site(site))
        return loaded, run.endpoints_for(loaded, names)
    except SiteError as exc:
        raise fail_input(exc.lines) from None
    except run.InputProblems as exc:
        raise fail_input(exc.lines) from None
    except run.PveInputError as exc:
        raise fail_input([str(exc)]) from None


def _progress(node: str, message: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {node}: {message}", highlight=False)


def _cell(value: str | None, limit: int = 60) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def print_plan(report: run.Report, title: str, to: object = None) -> None:
    rows: list[list[str] | None] = []
    for c in report.mappings:
        host = str(c.new or "").split(",", 1)[0].removeprefix("node=")
        rows.append([host, "-", c.action, c.target.removeprefix("mapping "),
                     f"{_cell(c.old)} -> {_cell(c.new)}", c.note])
    for n in report.nodes:
        changes: list[Change] = n.plan.changes if n.plan else []
        if rows and (changes or not n.result.ok):
            rows.append(None)
        if not n.result.ok and not changes:
            rows.append([n.node, str(n.vmid), "[red]error[/red]", "", "", n.result.error or ""])
            continue
        if not changes:
            rows.append([n.node, str(n.vmid), "[green]no change[/green]", "", "", ""])
        for c in changes:
            action = c.action if c.applied else f"[yellow]{c.action}[/yellow]"
            change = f"{_cell(c.old)} -> {_cell(c.new)}" if (c.old or c.new) else ""
            rows.append([n.node, str(n.vmid), action, c.key, change, c.note])
    output.print_table(to or out, title, [output.Column("node"), output.Column("vmid"),
                                    output.Column("action"), output.Column("key"),
                                    output.Column("change"), output.Column("note", wrap=True)],
                       rows)


def print_results(report: run.Report, verb: str, to: object = None) -> None:
    rows: list[list[str] | None] = []
    for n in report.nodes:
        r = n.result
        state = "[green]ok[/green]" if r.ok else "[red]failed[/red]"
        what = (f"{len(r.done)} change(s)" if r.done else "no change") if r.ok else \
            (r.error or "failed")
        if r.held:
            what += f"; held: {', '.join(c.key for c in r.held)} (see the plan)"
        if r.warnings:
            what += "; PVE warnings: " + "; ".join(r.warnings)
        rows.append([n.node, str(n.vmid), state, r.address or "-", f"{r.seconds:.1f}", what])
    output.print_table(to or out, f"{verb} result", [output.Column("node"),
                                                     output.Column("vmid"),
                                               output.Column("state"),
                                               output.Column("address"),
                                               output.Column("s", "right"),
                                               output.Column("result", wrap=True)], rows)


def _write_json(report: run.Report, target: str | None, extra: dict | None = None) -> None:
    if not target:
        return
    text = json.dumps(report.to_json() | (extra or {}), indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        Path(target).write_text(text)


def provision_command(nodes: NodesArg = None, site: SiteOpt = None,
                      dry_run: Annotated[bool, typer.Option(
                          "--dry-run", help="Read PVE and print the plan; change nothing.")
                      ] = False,
                      json_out: JsonOpt = None,
                      no_wait: Annotated[bool, typer.Option(
                          "--no-wait", help="Do not wait for the guest agent's address after "
                          "a start (images without qemu-guest-agent).")] = False) -> None:
    """Create or converge the Proxmox VMs of pve-guest nodes (PCI mappings included)."""
    loaded, endpoints = _open(site, nodes)
    report = run.provision(endpoints, dry_run=dry_run,
                           progress=None if dry_run else _progress, wait_agent=not no_wait)
    to = err if json_out == "-" else out      # stdout carries only the JSON then
    print_plan(report, "provision plan (dry run: nothing changed)" if dry_run
               else "provision plan", to)
    if not dry_run:
        print_results(report, "provision", to)
        path = run.record_addresses(loaded.path, report)
        if path:
            err.print(f"guest addresses recorded in {path}", highlight=False)
    _write_json(report, json_out, {"dry_run": dry_run})
    raise typer.Exit(0 if report.ok else 1)


def destroy_command(nodes: Annotated[list[str], typer.Argument(help="pve-guest nodes.")],
                    site: SiteOpt = None, json_out: JsonOpt = None) -> None:
    """Stop and remove the VMs of pve-guest nodes (purge: backup jobs, replication, HA)."""
    loaded, endpoints = _open(site, nodes)
    report = run.destroy(endpoints, progress=_progress)
    print_results(report, "destroy", err if json_out == "-" else out)
    run.record_addresses(loaded.path, report)
    _write_json(report, json_out)
    raise typer.Exit(0 if report.ok else 1)


def _gpunode(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpunode.cli.main", *args]


def rebuild_command(node: Annotated[str, typer.Argument(help="One pve-guest node.")],
                    site: SiteOpt = None,
                    engine: Annotated[str, typer.Option(help="pyinfra or ansible")] = "pyinfra",
                    junit: Annotated[str | None, typer.Option(
                        "--junit", help="JUnit XML of the checks.")] = None) -> None:
    """Destroy, provision, deploy and check one VM node: a reproducible rebuild."""
    loaded, endpoints = _open(site, [node])
    site_arg = str(loaded.path)
    steps: list[tuple[str, str, float, str]] = []

    def step(name: str, ok: bool, started: float, detail: str) -> None:
        steps.append((name, "[green]ok[/green]" if ok else "[red]failed[/red]",
                      time.monotonic() - started, detail))
        err.print(f"[bold]{name}[/bold]: {'ok' if ok else 'FAILED'} {detail}", highlight=False)

    def finish(code: int) -> typer.Exit:
        output.print_table(out, f"rebuild {node}", [
            output.Column("step"), output.Column("state"), output.Column("s", "right"),
            output.Column("detail", wrap=True)],
            [[s, st, f"{sec:.1f}", d] for s, st, sec, d in steps])
        return typer.Exit(code)

    t0 = time.monotonic()
    err.print(f"[bold]rebuild {node}[/bold] 1/4 destroy", highlight=False)
    report = run.destroy(endpoints, progress=_progress)
    r = report.nodes[0].result
    step("destroy", r.ok, t0, r.error or ("removed" if r.done else "was absent"))
    if not r.ok:
        raise finish(1)
    t0 = time.monotonic()
    err.print(f"[bold]rebuild {node}[/bold] 2/4 provision", highlight=False)
    report = run.provision(endpoints, progress=_progress)
    run.record_addresses(loaded.path, report)
    r = report.nodes[0].result
    step("provision", r.ok, t0, r.error or f"address {r.address}")
    if not r.ok:
        raise finish(1)
    t0 = time.monotonic()
    try:
        from gpunode.cli.check import key_path
        from gpunode.proxmox.ready import NotReady, wait_ready

        fresh = load_site(loaded.path)
        run.use_recorded_addresses(fresh)
        profile = fresh.nodes[node]
        waited = wait_ready(profile, key_path(profile, loaded.path),
                            profile.vm.agent_timeout_s if profile.vm else 600,
                            lambda msg: _progress(node, msg))
        step("ssh ready", True, t0, f"cloud-init done after {waited:.0f} s")
    except NotReady as exc:
        step("ssh ready", False, t0, str(exc))
        raise finish(1) from None
    for i, (name, cmd) in enumerate((
            ("deploy", _gpunode("deploy", node, "--site", site_arg, "--engine", engine)),
            ("check", _gpunode("check", node, "--site", site_arg,
                               *(["--junit", junit] if junit else [])))), start=3):
        t0 = time.monotonic()
        err.print(f"[bold]rebuild {node}[/bold] {i}/4 {name}", highlight=False)
        rc = subprocess.call(cmd)
        step(name, rc == 0, t0, f"gpunode {name} exit {rc}")
        if rc != 0:
            raise finish(1 if rc != 2 else 2)
    raise finish(0)
