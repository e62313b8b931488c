"""`gpunode lab pvesim ...`: run the simulated Proxmox VE API (SIMULATION, lab equipment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gpunode.lab import paths

app = typer.Typer(
    name="pvesim",
    help="Simulated Proxmox VE API (PVE 9 or 8.4) on 127.0.0.1, backed by lab VMs.",
    no_args_is_help=True,
    add_completion=False,
)
token_app = typer.Typer(help="API tokens (created through the simulated PVE API as root@pam).",
                        no_args_is_help=True, add_completion=False)
app.add_typer(token_app, name="token")

StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Lab directory [default: $GPUNODE_LAB_DIR, else "
                 "~/.cache/gpunode/lab/state]", envvar="GPUNODE_LAB_DIR"),
]


def _dir(state_dir: Path | None) -> Path:
    return (state_dir or paths.default_state_dir()).absolute()


@app.command()
def up(
    version: Annotated[str, typer.Option(help="PVE version to simulate: 9 or 8.4")] = "9",
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 = any free one)")] = 0,
    gpus: Annotated[int, typer.Option(help="RTX A6000s on the simulated node: 2 or 4")] = 2,
    vms: Annotated[bool, typer.Option("--vms/--no-vms",
                                      help="Boot lab VMs on start (qemu)")] = True,
    state_dir: StateDir = None,
) -> None:
    """Start pvesim as its own process (it keeps running after this command)."""
    from gpunode.lab.pvesim import server

    if version not in ("9", "8.4") or gpus not in (2, 4):
        typer.echo("error: --version takes 9 or 8.4, --gpus 2 or 4", err=True)
        raise typer.Exit(2)
    d = _dir(state_dir)
    ep = server.read_endpoint(d)
    if ep is not None:
        typer.echo(f"pvesim already running: {ep.url} (PVE {ep.version}, pid {ep.pid})")
        return
    try:
        ep, _ = server.spawn(d, version, gpus, port, vms, tie_to_parent=False)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"pvesim (SIMULATION of PVE {ep.version}) on {ep.url}\n"
               f"  CA file:       {ep.ca}\n"
               f"  root@pam:      password in {server.data_dir(d) / 'root-password'}\n"
               f"  node:          {ep.node}\n  pid:           {ep.pid}")


@app.command()
def down(state_dir: StateDir = None) -> None:
    """Stop pvesim and the lab VMs it started."""
    from gpunode.lab.pvesim import server

    stopped = server.terminate(_dir(state_dir))
    typer.echo("pvesim: stopped" if stopped else "pvesim: was not running")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    state_dir: StateDir = None,
) -> None:
    """Show whether pvesim runs, where, and as which PVE version (exit 1 if not running)."""
    from dataclasses import asdict

    from gpunode.lab.pvesim import server

    ep = server.read_endpoint(_dir(state_dir))
    if as_json:
        typer.echo(json.dumps(asdict(ep) if ep else None, indent=2))
    elif ep is None:
        typer.echo("pvesim: not running")
    else:
        typer.echo(f"pvesim: running, PVE {ep.version}, {ep.url}, CA {ep.ca}, pid {ep.pid}, "
                   f"VMs {'lab-backed' if ep.vms else 'not backed'}")
    if ep is None:
        raise typer.Exit(1)


@token_app.command("create")
def token_create(
    userid: Annotated[str, typer.Argument(help="user@realm, e.g. ci@pve (created if new)")],
    tokenid: Annotated[str, typer.Argument(help="token name, e.g. auto")],
    acl: Annotated[list[str], typer.Option(help="PATH:ROLE, repeatable (e.g. /vms:PVEVMAdmin)")
                   ] = [],  # noqa: B006 - typer needs a literal default
    privsep: Annotated[bool, typer.Option("--privsep/--no-privsep")] = True,
    out: Annotated[Path | None, typer.Option(help="Write the secret here (0600) instead of "
                                                  "printing it")] = None,
    state_dir: StateDir = None,
) -> None:
    """Create an API token with ACLs on the running pvesim."""
    import os

    from gpunode.lab.pvesim import server

    d = _dir(state_dir)
    ep = server.read_endpoint(d)
    if ep is None:
        typer.echo("error: pvesim is not running; start it with `gpunode lab pvesim up`",
                   err=True)
        raise typer.Exit(1)
    pairs = []
    for a in acl:
        path, sep, role = a.rpartition(":")
        if not sep or not path.startswith("/"):
            typer.echo(f"error: --acl {a!r}: use PATH:ROLE, e.g. /vms:PVEVMAdmin", err=True)
            raise typer.Exit(2)
        pairs.append((path, role))
    handle = server.PveSim(d)
    handle._ep = ep  # attach to the running server
    tok = handle.create_token(userid, tokenid, privsep=privsep, acl=pairs)
    if out is not None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(tok.secret + "\n")
        typer.echo(f"{tok.full_id}: secret written to {out}")
    else:
        typer.echo(f"{tok.full_id}\n{tok.secret}")
