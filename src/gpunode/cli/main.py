"""`gpunode ...`: validate, inventory, render, schema, deploy, check, sizing, lab.

Exit codes: 0 ok, 1 a host/check/operation failed, 2 invalid input (nothing touched)."""

from __future__ import annotations

import importlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.console import Console
from rich.markup import escape

from gpunode.cli import SiteOpt, fail_input, output
from gpunode.inventory import Site, SiteError, load_site, to_ansible, to_pyinfra
from gpunode.model import NodeProfile

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Infrastructure as code for LLM-serving NVIDIA GPU hosts.")
console = Console()
err = Console(stderr=True)


@dataclass
class ServiceSizing:
    """What the sizing planner said about one vLLM service, or why it could not run."""

    node: str
    service: str
    model: str
    where: str
    ran: bool
    reason: str = ""  # why sizing did not run
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if not self.ran:
            return "not run"
        return "fails" if self.errors else ("warnings" if self.warnings else "fits")

    def detail(self) -> str:
        return self.reason if not self.ran else "; ".join(self.errors + self.warnings)

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "service": self.service, "model": self.model,
                "ran": self.ran, "verdict": self.verdict, "reason": self.reason,
                "errors": self.errors, "warnings": self.warnings}


def size_services(site: Site) -> list[ServiceSizing]:
    """Run the vLLM sizing planner on every service; say per service why when it cannot."""
    try:
        from gpunode.sizing.shape import SizingError, hf_hub_cache_dir
        from gpunode.sizing.validate import check_service
    except ImportError:
        return []
    out: list[ServiceSizing] = []
    for p in site.nodes.values():
        for i, svc in enumerate(p.vllm.services):
            rec = ServiceSizing(p.name, svc.name, svc.model,
                                f"{site.path}: nodes.{p.name}.vllm.services[{i}] ({svc.name})",
                                ran=True)
            out.append(rec)
            try:
                findings = check_service(p, svc)
            except SizingError as exc:
                rec.ran, rec.reason = False, str(exc)
                continue
            if findings is None:
                rec.ran, rec.reason = False, _not_local(svc.model, svc.revision,
                                                        f"{len(svc.gpus) or 1}x{p.gpus.model}",
                                                        str(hf_hub_cache_dir()))
                continue
            for f in findings:
                if f.code == "gpu-unknown":
                    rec.ran, rec.reason = False, f.message
                elif f.level == "error":
                    rec.errors.append(f.message)
                else:
                    rec.warnings.append(f.message)
    return out


def _not_local(model: str, revision: str | None, gpus: str, hub: str) -> str:
    """Why sizing could not run for a model whose config.json is not here, and what to do."""
    local_copy = f"size a local copy with `gpunode sizing DIR --gpus '{gpus}'`"
    if model.startswith(("/", ".", "~")):
        return (f"config.json is not on this machine ({model} is a path on the node); "
                f"{local_copy}")
    rev = f" --revision {revision}" if revision else ""
    return (f"config.json is not on this machine (not in the Hugging Face cache {hub}); "
            f"`hf download {model} config.json{rev}` puts it there (HF_HOME picks the cache), "
            f"or {local_copy}")


def sizing_findings(site: Site) -> tuple[list[str], list[str]]:
    """(errors, warnings), one line each, from the services whose sizing ran."""
    errors: list[str] = []
    warnings: list[str] = []
    for rec in size_services(site):
        errors += [f"{rec.where}: {m}" for m in rec.errors]
        warnings += [f"{rec.where}: {m}" for m in rec.warnings]
    return errors, warnings


def open_site(site: str | None, deep: bool = True) -> Site:
    """Load and validate a site; bad input exits 2 with one line per problem."""
    from gpunode.core.lock import locked_site

    try:
        loaded = locked_site(load_site(site))  # <site>.lock, when present: checked, applied
    except SiteError as exc:
        raise fail_input(exc.lines) from None
    if deep:
        lines, warnings = sizing_findings(loaded)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        if lines:
            raise fail_input(lines)
    return loaded


@app.command()
def validate(
    site: SiteOpt = None,
    require_sizing: Annotated[bool, typer.Option(
        "--require-sizing", help="Exit 2 when sizing could not run for a service (its "
        "model's config.json is not on this machine), e.g. in CI.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]
    = False,
) -> None:
    """Validate the site file, size every vLLM service, and print a per-node summary."""
    from gpunode.core.lock import locked_site

    try:
        loaded = locked_site(load_site(site))  # and its lock, when there is one
    except SiteError as exc:
        raise fail_input(exc.lines) from None
    sized = size_services(loaded)
    errors = [f"{r.where}: {m}" for r in sized for m in r.errors]
    for r in sized:
        for m in r.warnings:
            print(f"warning: {r.where}: {m}", file=sys.stderr)
    if errors:
        raise fail_input(errors)
    not_run = [r for r in sized if not r.ran]
    if as_json:
        doc = {"site": str(loaded.path), "name": loaded.meta.name, "valid": True,
               "nodes": {n: _node_summary(p) for n, p in loaded.nodes.items()},
               "sizing": [r.to_dict() for r in sized]}
        print(json.dumps(doc, indent=2))
    else:
        out = output.console()
        columns = [output.Column(c) for c in ("node", "kind", "os", "groups", "GPUs", "driver")]
        columns.append(output.Column("services", wrap=True))
        rows: list[list[str] | None] = []
        for p in loaded.nodes.values():
            d = _node_summary(p)
            rows.append([p.name, d["kind"], d["os"], ",".join(d["groups"]) or "-",
                         d["gpus"] or "-", d["driver"], ", ".join(d["services"]) or "-"])
        output.print_table(out, escape(f"{loaded.path} ({loaded.meta.name})"), columns, rows)
        if sized:
            style = {"fits": "green", "warnings": "yellow", "not run": "yellow"}
            columns = [output.Column(c) for c in ("node", "service", "sizing")]
            columns.append(output.Column("detail", wrap=True))
            rows = [[r.node, r.service, f"[{style[r.verdict]}]{r.verdict}[/]",
                     escape(r.detail() or "-")] for r in sized]
            output.print_table(out, "vLLM sizing", columns, rows)
        out.print(f"[green]valid[/green]: {len(loaded.nodes)} node(s); sizing ran for "
                  f"{len(sized) - len(not_run)} of {len(sized)} service(s)", highlight=False)
    if require_sizing and not_run:
        raise fail_input([f"{r.where}: sizing did not run (--require-sizing): {r.reason}"
                          for r in not_run])


def _node_summary(p: NodeProfile) -> dict[str, Any]:
    driver = f"{p.nvidia.branch}" + (f" ={p.nvidia.version}" if p.nvidia.version else "")
    driver += " open" if p.nvidia.open_kernel_modules else " proprietary"
    return {"kind": p.kind, "os": p.os, "groups": list(p.groups),
            "gpus": f"{p.gpus.count}x {p.gpus.model}" if p.gpus.count else "",
            "driver": driver,
            "services": [f"{s.name} (tp={s.tensor_parallel_size}, :{s.port})"
                         for s in p.vllm.services]}


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
    from gpunode.core.files import node_files

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
_mount("gpunode.cli.deploy", "deploy", "Converge nodes (pyinfra or Ansible).")
_mount("gpunode.cli.check", "check", "Prove nodes match their profiles (testinfra).")
_mount("gpunode.cli.lock", "lock", "Resolve open versions into <site>.lock (reproducible nodes).")
_mount("gpunode.cli.lock", "manifest", "Print the manifest the deploy wrote on a node.")
_mount("gpunode.cli.lock", "drift", "Compare nodes with their lock, files and siblings.")
_mount("gpunode.proxmox.cli", "provision", "Create or converge Proxmox GPU VMs.")
_mount("gpunode.proxmox.cli", "destroy", "Remove Proxmox VMs of pve-guest nodes.")
_mount("gpunode.proxmox.cli", "rebuild", "Destroy, provision, deploy and check one VM.")


def _no_value(ctx: object = None) -> None:
    return None


def label_types(command: Any) -> None:
    """Correct the value labels of `--help` for COMMAND and its subcommands: a flag takes no
    value (typer labels it `<bool>`), and a repeatable option or a variadic argument takes
    one value per occurrence (`<str>`, not `<list[str]>`)."""
    for param in command.params:
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.display_type_rich = _no_value
        elif getattr(param, "multiple", False) or param.nargs == -1:
            show = getattr(param, "display_type_rich", None)
            if show is not None:
                label = re.sub(r"^<list\[(.*)\]>(\.\.\.)?$", r"<\1>", str(show(ctx=None)))
                param.display_type_rich = lambda ctx=None, label=label: label
    help_option = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = help_option(ctx)
        if option is not None:
            option.display_type_rich = _no_value
        return option

    command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        label_types(sub)


def cli_command() -> Any:
    """The click command behind `gpunode`, with corrected `--help` labels."""
    command = typer.main.get_command(app)
    label_types(command)
    return command


def main() -> None:
    cli_command()(prog_name="gpunode")


if __name__ == "__main__":
    main()
