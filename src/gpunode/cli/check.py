"""`gpunode check`: run the testinfra suite (`checks/`) against a site's nodes over SSH
(paramiko), print a per-host/per-concern table, write JSON (also the drift report for
monitoring) and JUnit. Exit 0 all passed, 1 a check failed or a host was unreachable,
2 invalid input (unknown node, invalid site, missing key file)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from gpunode.cli import output
from gpunode.core.resources import data_path
from gpunode.inventory import Site, SiteError, load_site
from gpunode.model import NodeProfile

CHECKS_DIR = data_path("checks")
OUTCOMES = ("passed", "failed", "error", "skipped")
#: Marker expression of a default run: the slow checks have fast stand-ins that run always
#: (e.g. the initramfs is newer than the nouveau blacklist instead of listing it).
DEFAULT_MARKERS = "not slow"


class InputError(Exception):
    """Bad input: the lines say what is wrong and where."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


# --- what to run --------------------------------------------------------------------------

def key_path(p: NodeProfile, site_path: Path) -> Path | None:
    """The node's SSH key as an absolute path (relative: to the working directory, else to
    the site file's directory)."""
    if not p.connection.key:
        return None
    key = Path(p.connection.key).expanduser()
    if not key.is_absolute() and not key.exists() and (site_path.parent / key).exists():
        key = site_path.parent / key
    return key.resolve()


def ssh_config_quote(value: str) -> str:
    """An ssh_config argument: double-quoted when it holds spaces; a line break refused."""
    if any(c in value for c in '\n\r\x00"'):
        raise ValueError(f"refusing to write {value!r} into an ssh_config")
    return f'"{value}"' if any(c.isspace() for c in value) else value


def ssh_config_text(profiles: list[NodeProfile], site_path: Path) -> str:
    """An ssh_config with one Host block per node, named like the node."""
    blocks = []
    for p in profiles:
        c = p.connection
        lines = [f"Host {p.name}", f"    HostName {c.address}", f"    Port {c.port}",
                 f"    User {c.user}"]
        key = key_path(p, site_path)
        if key is not None:
            lines.append(f"    IdentityFile {ssh_config_quote(str(key))}")
        lines += ["    StrictHostKeyChecking no", "    UserKnownHostsFile /dev/null"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def needs_sudo(p: NodeProfile) -> bool:
    return p.connection.become and p.connection.user != "root"


@dataclass
class Batch:
    """Nodes checked by one pytest run (same sudo setting)."""

    sudo: bool
    nodes: list[str]


def batches(profiles: list[NodeProfile]) -> list[Batch]:
    by_sudo: dict[bool, list[str]] = defaultdict(list)
    for p in profiles:
        by_sudo[needs_sudo(p)].append(p.name)
    return [Batch(sudo, names) for sudo, names in sorted(by_sudo.items())]


def pytest_args(batch: Batch, site_path: Path, ssh_config: Path, results: Path,
                junit: Path | None = None, markers: str | None = None,
                keyword: str | None = None, checks_dir: Path = CHECKS_DIR) -> list[str]:
    args = [str(checks_dir), f"--hosts={','.join(f'paramiko://{n}' for n in batch.nodes)}",
            f"--ssh-config={ssh_config}", "--site", str(site_path),
            "--gpunode-results", str(results), "-p", "no:cacheprovider", "-q", "--tb=no",
            "--no-header", "-o", "addopts=", f"--rootdir={checks_dir}"]
    if batch.sudo:
        args.append("--sudo")
    if markers:
        args += ["-m", markers]
    if keyword:
        args += ["-k", keyword]
    if junit is not None:
        args.append(f"--junitxml={junit}")
    return args


# --- what came back -------------------------------------------------------------------------

def collate(records: list[dict[str, Any]], hosts: list[str]) -> dict[str, Any]:
    """Per host: status, counts per concern, and the failed checks with their messages."""
    out: dict[str, Any] = {}
    for host in hosts:
        mine = [r for r in records if r["host"] == host]
        concerns: dict[str, dict[str, int]] = {}
        for r in mine:
            counts = concerns.setdefault(r["concern"], dict.fromkeys(OUTCOMES, 0))
            counts[r["outcome"]] += 1
        drifted = [{"concern": r["concern"], "check": r["check"], "outcome": r["outcome"],
                    "message": r["message"]} for r in mine if r["outcome"] in ("failed", "error")]
        ran = [r for r in mine if r["outcome"] != "skipped"]
        if not mine:
            status = "not-run"
        elif ran and all(r["outcome"] == "error" for r in ran):
            status = "unreachable"
        elif drifted:
            status = "drifted"
        else:
            status = "ok"
        total = {o: sum(c[o] for c in concerns.values()) for o in OUTCOMES}
        out[host] = {"status": status, "ok": status == "ok", "counts": total,
                     "duration_s": round(sum(r.get("duration_s", 0.0) for r in mine), 2),
                     "concerns": dict(sorted(concerns.items())), "drifted": drifted}
    return out


def report(site: Site, hosts: dict[str, Any], started: float, markers: str | None) -> dict[str, Any]:
    return {
        "site": str(site.path),
        "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 2),
        "markers": markers,
        "ok": all(h["ok"] for h in hosts.values()),
        "hosts": hosts,
    }


def merge_junit(parts: list[Path], out: Path) -> None:
    """Write one JUnit file holding every part's test suites."""
    root = ET.Element("testsuites")
    for part in parts:
        if not part.exists():
            continue
        tree = ET.parse(part).getroot()
        suites = [tree] if tree.tag == "testsuite" else list(tree)
        root.extend(suites)
    out.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


def group_by_message(drifted: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Failure message -> the checks that failed with it (an unreachable host fails every
    check with the same message: say it once)."""
    out: dict[str, list[str]] = {}
    for d in drifted:
        out.setdefault(d["message"], []).append(f"{d['concern']}::{d['check']}")
    return out


def print_table(console: Console, hosts: dict[str, Any]) -> None:
    columns = [output.Column("host"), output.Column("concern")]
    columns += [output.Column(c, "right") for c in ("passed", "failed", "skipped")]
    columns.append(output.Column("result"))
    rows: list[list[str] | None] = []
    for host, data in hosts.items():
        if not data["concerns"]:
            rows.append([host, "-", "0", "0", "0", f"[red]{data['status']}[/red]"])
        for concern, c in data["concerns"].items():
            bad = c["failed"] + c["error"]
            result = "[red]FAIL[/red]" if bad else ("[green]ok[/green]" if c["passed"]
                                                    else "[dim]skipped[/dim]")
            rows.append([host, concern, str(c["passed"]), str(bad), str(c["skipped"]), result])
        rows.append(None)
    output.print_table(console, "gpunode check", columns, rows)
    for host, data in hosts.items():
        for message, checks in group_by_message(data["drifted"]).items():
            where = checks[0] if len(checks) == 1 else f"{len(checks)} checks ({checks[0]}, ...)"
            output.echo(console, f"{host} {where}:")
            for line in message.splitlines() or [""]:
                output.echo(console, line, indent="    ")
    for host, data in hosts.items():
        c = data["counts"]
        output.echo(console, f"{host}: {data['status']} — {c['passed']} passed, "
                    f"{c['failed'] + c['error']} failed, {c['skipped']} skipped "
                    f"in {data['duration_s']:.1f} s")


# --- running ------------------------------------------------------------------------------

def select(site: Site, nodes: list[str] | None, all_: bool) -> list[NodeProfile]:
    if nodes and all_:
        raise InputError(["give node names or --all, not both"])
    try:
        chosen = site.select(nodes or None)
    except SiteError as exc:
        raise InputError(exc.lines) from None
    if not chosen:
        raise InputError([f"{site.path}: the site has no nodes"])
    for p in chosen:
        key = key_path(p, site.path)
        if key is not None and not key.exists():
            raise InputError([f"{site.path}: node {p.name}: connection.key {p.connection.key} "
                              f"does not exist ({key}); fix the path or remove the key"])
    return chosen


def run_checks(site: Site, profiles: list[NodeProfile], markers: str | None,
               junit: Path | None, echo: Console, verbose: bool,
               keyword: str | None = None) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpunode-check-") as tmp:
        tmpdir = Path(tmp)
        ssh_config = tmpdir / "ssh_config"
        ssh_config.write_text(ssh_config_text(profiles, site.path))
        ssh_config.chmod(0o600)
        junit_parts = []
        for i, batch in enumerate(batches(profiles)):
            results = tmpdir / f"results-{i}.json"
            part = tmpdir / f"junit-{i}.xml" if junit else None
            if part:
                junit_parts.append(part)
            args = pytest_args(batch, site.path.resolve(), ssh_config, results, part, markers,
                               keyword)
            echo.print(f"checking {', '.join(batch.nodes)} ...", highlight=False)
            proc = subprocess.run([sys.executable, "-m", "pytest", *args], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            if verbose:
                echo.print(proc.stdout + proc.stderr, highlight=False, markup=False)
            if proc.returncode == 4:  # usage error: bad options or site
                raise InputError([line for line in (proc.stderr or proc.stdout).splitlines()
                                  if line.strip()][-10:])
            if results.exists():
                records += json.loads(results.read_text())["results"]
            if proc.returncode not in (0, 1, 5) or not results.exists():
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
                echo.print(f"[red]pytest exited {proc.returncode}[/red] for "
                           f"{', '.join(batch.nodes)}:\n" + "\n".join(tail), highlight=False)
        if junit:
            merge_junit(junit_parts, junit)
    return records


def command(
    nodes: Annotated[list[str] | None, typer.Argument(help="Node or group names "
                                                      "(default: every node)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Check every node of the site.")] = False,
    site: Annotated[str | None, typer.Option("--site", help="Site file (else $GPUNODE_SITE, "
                                              "else inventory/site.yaml).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON "
                                                  "(per host and concern, with messages) to "
                                                  "this file; '-' prints them instead of the "
                                                  "table.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML.")] = None,
    markers: Annotated[str | None, typer.Option("-m", "--markers", help="pytest marker "
                                                "expression (default: 'not slow', or all "
                                                "with --full), e.g. 'gpu'.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Also run the slow checks (initramfs "
                                       "listing: ~15 s on a TCG VM).")] = False,
    keyword: Annotated[str | None, typer.Option("-k", "--keyword", help="Only checks whose "
                                                "names match this pytest -k expression.")] = None,
    drift: Annotated[bool, typer.Option("--drift", help="Print the per-host drift report "
                                        "(JSON, for monitoring) instead of the table.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show pytest's output.")] = False,
) -> None:
    """Prove nodes match their profiles: run the testinfra checks over SSH."""
    if markers is None and not full:
        markers = DEFAULT_MARKERS
    to_stdout = drift or (json_out is not None and str(json_out) == "-")
    console = output.console()
    status = output.console(stderr=True) if to_stdout else console
    started = time.monotonic()
    try:
        loaded = load_site(site)
        profiles = select(loaded, nodes, all_)
        records = run_checks(loaded, profiles, markers, junit, status, verbose, keyword)
    except SiteError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        raise typer.Exit(2) from None
    except InputError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        raise typer.Exit(2) from None
    hosts = collate(records, [p.name for p in profiles])
    doc = report(loaded, hosts, started, markers)
    if json_out and str(json_out) != "-":
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=2) + "\n")
    if to_stdout:
        print(json.dumps(doc, indent=2))
    else:
        print_table(console, hosts)
    raise typer.Exit(0 if doc["ok"] else 1)


#: The name gpunode.cli.main mounts as `gpunode check`.
check_command = command
