"""`gpunode deploy`: converge nodes with pyinfra (or Ansible) from the site file.

Input is validated first (exit 2, nothing touched); hosts that fail (unreachable, apt
errors, reboot needed under policy `never`) are reported by name and do not stop the
others; any failed host gives exit 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gpunode.core.resources import ansible_root, data_root
from gpunode.engines.pyinfra import STOP_PREFIX
from gpunode.inventory import Site, SiteError

console = Console(stderr=True)

# pyinfra 3 prints, per operation, "--> Starting operation: NAME" and per host
# "[host] Success", "[host] No changes" or "[host] Error..." lines; gpunode's own stops
# come as "[host] gpunode stop: WHY" just before the host's error line.
OP_START = re.compile(r"--> Starting operation: (.+)")
HOST_STOP = re.compile(r"^\s*\[(?P<host>[^\]]+)\]\s+" + re.escape(STOP_PREFIX) + r"(?P<why>.*)$")
HOST_LINE = re.compile(r"^\s*\[(?P<host>[^\]]+)\]\s+(?P<text>.*)$")
HOST_RESULT = re.compile(r"^\s*\[(?P<host>[^\]]+)\]\s+(?P<what>Success|No changes|Error.*)$")
# pyinfra's connector messages when it cannot reach or log in to a host (ssh.py's
# raise_connect_error, host.py's "Host key ..."): that host then runs nothing.
CONNECT_ERROR = re.compile(r"^(SSH error|Could not resolve hostname|Could not connect|EOF error"
                           r"|Authentication error|Host key)")
# --dry: pyinfra's table of the changes it detected while preparing (pyinfra_cli.prints.
# print_meta): one row per operation, its Change and Conditional Change columns "-" or
# "N (host, host, ...)" (the names truncated to 48 characters).
DETECTED = re.compile(r"^\s*--> Detected changes:")
DETECTED_ROW = re.compile(r"^\s+(?P<op>\S.*?)\s{2,}(?P<change>-|\d+ \(.*?\))\s{2,}"
                          r"(?P<cond>-|\d+ \(.*?\))\s*$")


@dataclass
class HostResult:
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    errors: list[str] = field(default_factory=list)


def preflight(site: Site, names: list[str]) -> list[str]:
    """Input problems found before any host is touched (one line each)."""
    problems = []
    for p in site.select(names):
        token = p.vllm.hf_token_file
        if token and p.vllm.services and not Path(token).expanduser().is_file():
            problems.append(f"{site.path}: nodes.{p.name}.vllm.hf_token_file: {token} is not "
                            "a readable file on this machine")
        for i, svc in enumerate(p.vllm.services):
            if svc.api_key_file and not Path(svc.api_key_file).expanduser().is_file():
                problems.append(f"{site.path}: nodes.{p.name}.vllm.services[{i}].api_key_file: "
                                f"{svc.api_key_file} is not a readable file on this machine")
    return problems


#: The entry (pyinfra deploy file, Ansible playbook) per node kind, in the order they run:
#: Proxmox hosts first, their GPUs then go to VMs.
ENTRIES = (("pve_host", frozenset({"pve-host"})),
           ("gpu_node", frozenset({"bare-metal", "pve-guest"})))


def by_entry(site: Site, names: list[str]) -> list[tuple[str, list[str]]]:
    """The chosen nodes split by entry, in run order, without empty entries."""
    out = []
    for entry, kinds in ENTRIES:
        hosts = [n for n in names if site.nodes[n].kind in kinds]
        if hosts:
            out.append((entry, hosts))
    return out


def pyinfra_command(site_path: Path, hosts: list[str], dry_run: bool = False,
                    entry: str = "gpu_node") -> tuple[list[str], dict[str, str]]:
    """The pyinfra command line and environment that deploy `hosts` of the site."""
    env = {**os.environ, "GPUNODE_SITE": str(site_path.resolve()),
           "GPUNODE_LIMIT": ",".join(hosts), "PYTHONUNBUFFERED": "1"}
    # --dry without -y: with -y, pyinfra skips its change detection and reports nothing
    cmd = [str(Path(sys.executable).with_name("pyinfra")), "--dry" if dry_run else "-y"]
    root = data_root()  # the shipped inventory/ and deploy/ (a checkout's, or the wheel's)
    cmd += [str(root / "inventory" / "pyinfra_inventory.py"), str(root / "deploy" / f"{entry}.py")]
    return cmd, env


def run_pyinfra(site_path: Path, hosts: list[str], dry_run: bool = False,
                verbose: bool = False, entry: str = "gpu_node", timeout_s: float | None = None
                ) -> tuple[int, dict[str, HostResult], float]:
    """Run pyinfra and read its results. `timeout_s` (the lab tests' bound) kills a run that
    has not finished by then; every host without a result then says so."""
    cmd, env = pyinfra_command(site_path, hosts, dry_run, entry)
    results: dict[str, HostResult] = {h: HostResult() for h in hosts}
    started = time.monotonic()
    with subprocess.Popen(cmd, cwd=data_root(), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        watchdog = threading.Timer(timeout_s, proc.kill) if timeout_s else None
        if watchdog:
            watchdog.start()
        try:
            assert proc.stdout is not None
            last_op = read_pyinfra_output(proc.stdout, results, verbose)
            rc = proc.wait()
        finally:
            if watchdog:
                watchdog.cancel()
    if watchdog and watchdog.finished.is_set() and rc < 0:
        for res in results.values():
            res.errors.append(f"pyinfra was stopped after {timeout_s:.0f} s (the run's "
                              f"timeout), in: {last_op or 'connecting'}")
    fail_silent_hosts(rc, results)
    return rc, results, time.monotonic() - started


def fail_silent_hosts(rc: int, results: dict[str, HostResult]) -> None:
    """After a failed pyinfra run, a host with no result at all did not get its deploy."""
    if rc == 0:
        return
    for res in results.values():
        if not (res.changed or res.unchanged or res.errors):
            res.errors.append(f"pyinfra exited {rc} before any operation ran on this host "
                              "(run with -v for its output)")


def read_pyinfra_output(lines: Iterable[str], results: dict[str, HostResult],
                        verbose: bool = False) -> str:
    """Fill `results` from pyinfra's output (per host: changed operations, unchanged count,
    errors with gpunode's stop message or the failed command's last output lines), echoing
    progress and error lines. Returns the last operation that started."""
    op, detecting = "", False
    said: dict[str, list[str]] = {h: [] for h in results}  # host lines since its last result
    for line in lines:
        text = re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip("\n"))
        if verbose:
            console.print(text, markup=False, highlight=False)
        if DETECTED.match(text):
            detecting = True
            continue
        if detecting:
            detecting = _detected_row(text, results)
            continue
        match = OP_START.search(text)
        if match:
            op = match.group(1).strip()
            if not verbose:
                console.print(f"[dim]-> {op}[/dim]", soft_wrap=True)
            continue
        match = HOST_STOP.match(text) or HOST_RESULT.match(text) or HOST_LINE.match(text)
        if not (match and match.group("host") in results):
            # errors pyinfra reports outside a host's lines (not its results table header)
            if ("Error" in text or "error" in text) and "No Change" not in text and not verbose:
                console.print(text, markup=False, highlight=False, soft_wrap=True)
            continue
        host = match.group("host")
        res, groups = results[host], match.groupdict()
        if groups.get("why") is not None:
            res.errors.append(f"{op}: {groups['why']}")
            said[host] = []
        elif groups.get("what") is None and CONNECT_ERROR.match(groups["text"].strip()):
            res.errors.append(f"connecting: {groups['text'].strip()}")
        elif groups.get("what") is None:
            said[host].append(groups["text"].strip())
        elif groups["what"] == "Success":
            res.changed.append(op)
            said[host] = []
        elif groups["what"] == "No changes":
            res.unchanged += 1
            said[host] = []
        else:
            if not (res.errors and res.errors[-1].startswith(f"{op}: ")):
                detail = " | ".join(x for x in said[host][-3:] if x)
                res.errors.append(f"{op}: {groups['what']}" + (f": {detail}" if detail else ""))
            said[host] = []
    return op


def _detected_row(text: str, results: dict[str, HostResult]) -> bool:
    """One line of pyinfra's detected-changes table (--dry): each host it names (every host
    when the count covers them all, the names being truncated) would change this
    operation. False once the table has ended."""
    if not text.strip():
        return False
    row = DETECTED_ROW.match(text)
    if row is None or row.group("op") == "Operation":
        return True
    for col in (row.group("change"), row.group("cond")):
        if col == "-":
            continue
        count, _, names = col.partition(" (")
        hosts = (list(results) if int(count) >= len(results) else
                 [h for h in (n.strip() for n in names.rstrip(")").split(",")) if h in results])
        for host in hosts:
            results[host].changed.append(row.group("op"))
    return True


def deploy_command(
    nodes: Annotated[list[str] | None, typer.Argument(help="Nodes or groups (default: all).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every node in the site.")] = False,
    site: Annotated[str | None, typer.Option("--site", help="Site file.")] = None,
    engine: Annotated[str, typer.Option(help="pyinfra or ansible")] = "pyinfra",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Engine output.")] = False,
) -> None:
    """Converge NODE... (or --all) to their profiles."""
    from gpunode.cli import fail_input
    from gpunode.cli.main import open_site

    loaded = open_site(site)
    try:
        chosen = [p.name for p in loaded.select(nodes if not all_ else [])]
    except SiteError as exc:
        raise fail_input(exc.lines) from None
    problems = preflight(loaded, chosen)
    if problems:
        raise fail_input(problems)
    if engine not in ("pyinfra", "ansible"):
        raise fail_input([f"--engine: {engine!r} is not one of pyinfra, ansible"])
    runs = by_entry(loaded, chosen)
    if engine == "ansible":
        try:
            ansible_root()
        except FileNotFoundError as exc:
            raise fail_input([f"--engine ansible: {exc}"]) from None
        codes = [run_ansible(loaded.path, hosts, dry_run, verbose, entry) for entry, hosts in runs]
        raise typer.Exit(0 if not any(codes) else 1)
    rc, results, seconds = 0, {}, 0.0
    for entry, hosts in runs:
        code, res, took = run_pyinfra(loaded.path, hosts, dry_run, verbose, entry)
        rc, seconds = rc or code, seconds + took
        results.update(res)
    if dry_run:  # what pyinfra detected while preparing; nothing ran
        table = Table(title=f"gpunode deploy --dry-run ({seconds:.1f} s): nothing was changed")
        cols: tuple[str, ...] = ("node", "would change", "result")
    else:
        table = Table(title=f"gpunode deploy ({seconds:.1f} s)")
        cols = ("node", "changed", "unchanged", "result")
    for col in cols:
        table.add_column(col)
    failed = rc != 0
    for name, res in results.items():
        status = "[red]failed[/red]" if res.errors else "[green]ok[/green]"
        counts = [str(len(res.changed))] + ([] if dry_run else [str(res.unchanged)])
        table.add_row(name, *counts, status)
        if dry_run and res.changed:
            console.print(f"{name} would change (detected before running; later operations "
                          "may follow from these):", highlight=False)
            for op in res.changed:
                console.print(f"  {op}", markup=False, highlight=False)
        for err in res.errors:
            console.print(f"[red]{name}[/red]: {err}", highlight=False)
        failed |= bool(res.errors)
    console.print(table)
    raise typer.Exit(1 if failed else 0)


def ansible_env(site_path: Path) -> dict[str, str]:
    """The environment ansible-playbook runs in over gpunode's inventory: the site, gpunode's
    ansible.cfg, and this interpreter's bin first on PATH, so that the inventory script's
    `#!/usr/bin/env python3` finds a Python that has gpunode."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "GPUNODE_SITE": str(site_path.resolve()),
            "ANSIBLE_CONFIG": str(ansible_root() / "ansible.cfg"), "PATH": path}


def run_ansible(site_path: Path, hosts: list[str], check: bool, verbose: bool,
                entry: str = "gpu_node") -> int:
    root = ansible_root()
    env = ansible_env(site_path)
    cmd = [str(Path(sys.executable).with_name("ansible-playbook")),
           str(root / "playbooks" / f"{entry}.yml"), "--limit", ",".join(hosts)]
    if check:
        cmd += ["--check", "--diff"]
    if verbose:
        cmd.append("-v")
    return subprocess.call(cmd, cwd=root, env=env)
