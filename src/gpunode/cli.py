"""`gpunode ...`: validate, inventory, render, schema, deploy, check, sizing, lab.

Exit codes: 0 ok, 1 a host/check/operation failed, 2 invalid input (nothing touched)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gpunode.inventory import Site, SiteError, load_site, to_ansible, to_pyinfra

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Infrastructure as code for LLM-serving NVIDIA GPU hosts.")
console = Console()
err = Console(stderr=True)

SiteOpt = Annotated[str | None, typer.Option("--site", help="Site file (else $GPUNODE_SITE, "
                                              "else inventory/site.yaml).")]


def fail_input(lines: list[str]) -> typer.Exit:
    for line in lines:
        print(line, file=sys.stderr)
    return typer.Exit(2)


def open_site(site: str | None, deep: bool = True) -> Site:
    """Load and validate a site; bad input exits 2 with one line per problem."""
    try:
        loaded = load_site(site)
    except SiteError as exc:
        raise fail_input(exc.lines) from None
    if deep:
        lines, warnings = sizing_findings(loaded)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        if lines:
            raise fail_input(lines)
    return loaded


def sizing_findings(site: Site) -> tuple[list[str], list[str]]:
    """Run the vLLM sizing planner on every service whose model config is available."""
    try:
        from gpunode.sizing.validate import check_site
    except ImportError:
        return [], []
    return check_site(site)


@app.command()
def validate(site: SiteOpt = None) -> None:
    """Validate the site file and print a per-node summary."""
    loaded = open_site(site)
    table = Table(title=f"{loaded.path} ({loaded.meta.name})")
    for col in ("node", "kind", "os", "groups", "GPUs", "driver", "services"):
        table.add_column(col)
    for p in loaded.nodes.values():
        services = ", ".join(f"{s.name} (tp={s.tensor_parallel_size}, :{s.port})"
                             for s in p.vllm.services) or "-"
        driver = f"{p.nvidia.branch}" + (f" ={p.nvidia.version}" if p.nvidia.version else "")
        driver += " open" if p.nvidia.open_kernel_modules else " proprietary"
        table.add_row(p.name, p.kind, p.os, ",".join(p.groups) or "-",
                      f"{p.gpus.count}x {p.gpus.model}" if p.gpus.count else "-", driver,
                      services)
    console.print(table)
    console.print(f"[green]valid[/green]: {len(loaded.nodes)} node(s)")


@app.command()
def inventory(site: SiteOpt = None,
              format: Annotated[str, typer.Option(help="ansible | pyinfra | json")] = "json"
              ) -> None:
    """Print the resolved inventory for an engine."""
    loaded = open_site(site, deep=False)
    if format == "ansible":
        data = to_ansible(loaded)
    elif format == "pyinfra":
        data = {g: [[h, d] for h, d in hosts] for g, hosts in to_pyinfra(loaded).items()}
    elif format == "json":
        data = {n: p.model_dump(mode="json") for n, p in loaded.nodes.items()}
    else:
        raise fail_input([f"--format: {format!r} is not one of ansible, pyinfra, json"])
    print(json.dumps(data, indent=2, sort_keys=True))


@app.command()
def render(node: str, out: Annotated[Path, typer.Option("--out")],
           site: SiteOpt = None) -> None:
    """Write every file the deploy would write for NODE under OUT, for review."""
    from gpunode.files import node_files

    loaded = open_site(site)
    profile = loaded.select([node])[0]
    written = 0
    for f in node_files(profile):
        target = out / f.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.content)
        target.chmod(f.mode)
        written += 1
    console.print(f"wrote {written} file(s) for {node} under {out}")


@app.command()
def schema(out: Annotated[Path | None, typer.Option("--out")] = None) -> None:
    """Print (or write) the JSON Schema of the site file."""
    from gpunode.model import SiteSchema

    text = json.dumps(SiteSchema.json_schema(), indent=2, sort_keys=True) + "\n"
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)


def _mount(module: str, name: str, help_text: str) -> None:
    try:
        sub = importlib.import_module(module)
    except ImportError:
        return
    command = getattr(sub, f"{name}_command", None)
    target = getattr(sub, "app", None)
    if callable(command):
        app.command(name, help=help_text)(command)
    elif isinstance(target, typer.Typer):
        app.add_typer(target, name=name, help=help_text)


_mount("gpunode.lab.cli", "lab", "Local test VMs (qemu) and the simulated NVIDIA stack.")
_mount("gpunode.sizing.cli", "sizing", "Will a model fit? vLLM memory and KV-cache planner.")
_mount("gpunode.deploy_cli", "deploy", "Converge nodes (pyinfra or Ansible).")
_mount("gpunode.checks_cli", "check", "Prove nodes match their profiles (testinfra).")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
