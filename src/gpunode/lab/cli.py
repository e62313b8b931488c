"""`gpunode lab ...`: local Debian 12 test VMs (qemu, loopback networking only)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from gpunode.lab import deps as lab_deps
from gpunode.lab import image as lab_image
from gpunode.lab import paths as lab_paths
from gpunode.lab.core import Lab
from gpunode.lab.errors import LabError, LabInputError
from gpunode.lab.pvesim import cli as pvesim_cli

app = typer.Typer(
    name="lab",
    help="Local Debian 12 test VMs under qemu, reachable only on 127.0.0.1.",
    no_args_is_help=True,
    add_completion=False,
)

app.add_typer(pvesim_cli.app, name="pvesim")

T = TypeVar("T")

StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Lab directory [default: $GPUNODE_LAB_DIR, else "
                 "~/.cache/gpunode/lab/state]", envvar="GPUNODE_LAB_DIR"),
]


def _guard(fn: Callable[[], T]) -> T:
    """Run `fn`; turn lab errors into a message and an exit code (2: bad input, 1: failed)."""
    try:
        return fn()
    except LabInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except LabError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _parse_forward(specs: list[str]) -> dict[int, int] | None:
    if not specs:
        return None
    out: dict[int, int] = {}
    for spec in specs:
        guest, _, host = spec.partition(":")
        if not guest.isdigit() or (host and not host.isdigit()):
            raise LabInputError(f"--forward {spec!r}: use GUEST_PORT or GUEST_PORT:HOST_PORT")
        out[int(guest)] = int(host or 0)
    return out


@app.command()
def up(
    names: Annotated[list[str], typer.Argument(help="VM names (they become hostnames)")],
    cpus: Annotated[int, typer.Option(help="vCPUs")] = 2,
    memory: Annotated[int, typer.Option(help="Memory in MiB")] = 2048,
    numa: Annotated[int, typer.Option(help="Emulated NUMA nodes")] = 2,
    disk: Annotated[int, typer.Option(help="Disk size in GiB")] = 8,
    forward: Annotated[list[str], typer.Option(
        help="Forward GUEST[:HOST] TCP port to 127.0.0.1 (repeatable; HOST 0/absent = any)"
    )] = [],  # noqa: B006 - typer needs a literal default
    iommu: Annotated[bool | None, typer.Option(
        "--iommu/--no-iommu",
        help="Emulated VT-d IOMMU (interrupt remapping) and PCI stand-ins for passthrough "
             "GPUs (a lab Proxmox host); kept by the VM (default: what it has, off when new)"
    )] = None,
    os_name: Annotated[str, typer.Option(
        "--os", help=f"Guest OS of a new VM: {', '.join(lab_image.LAB_OS)} (an existing VM "
                     "keeps its own)")] = "debian-12",
    kernel: Annotated[str, typer.Option(
        "--kernel", help="Kernel of a new VM: generic (the release's own) or hwe (Ubuntu's "
                         "HWE kernel); an existing VM keeps its own")] = "generic",
    state_dir: StateDir = None,
) -> None:
    """Start VMs (creating them from their OS's base image), wait for SSH."""
    lab = Lab(state_dir)
    fwd = _guard(lambda: _parse_forward(forward))
    if state_dir is not None:
        remember(lab.dir)
    for name in names:
        vm = _guard(lambda n=name: lab.up(n, cpus=cpus, memory_mib=memory, numa=numa,  # type: ignore[misc]
                                          disk_gib=disk, forward=fwd, iommu=iommu,
                                          os_name=os_name, kernel=kernel))
        extra = "".join(f" {g}->127.0.0.1:{h}" for g, h in vm.forwards.items())
        typer.echo(f"{vm.name}: up, ssh {vm.user}@{vm.address} -p {vm.ssh_port}{extra}")


@app.command()
def down(
    names: Annotated[list[str] | None, typer.Argument(help="VM names")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every VM of every lab (the "
                                       "default lab, `make demo`'s, test runs' and labs "
                                       "made with --state-dir), or of --state-dir's lab")]
    = False,
    purge: Annotated[bool, typer.Option("--purge", help="Also delete what the labs hold on "
                                        "disk: VM disks, seeds, logs, snapshots, keys, the "
                                        "simulated mirrors (the base image cache stays)")]
    = False,
    state_dir: StateDir = None,
) -> None:
    """Stop VMs (their disks stay unless --purge)."""
    if all_:
        for lab_dir in known_labs(state_dir):
            owner = _session_owner(lab_dir)
            if owner:
                typer.echo(f"{lab_dir}: left alone, in use by the test session pid {owner}")
                continue
            lab = Lab(lab_dir)
            stopped = _guard(lab.down_all)
            from gpunode.lab.sim import server

            server.stop(lab.dir)
            typer.echo(f"{lab.dir}: stopped {', '.join(stopped) or 'nothing (none running)'}")
            if purge:
                size = disk_usage(lab.dir)
                shutil.rmtree(lab.dir, ignore_errors=True)
                _forget(lab.dir)
                typer.echo(f"{lab.dir}: purged ({_human(size)} freed)")
        return
    if not names:
        typer.echo("error: name the VMs to stop, or pass --all", err=True)
        raise typer.Exit(2)
    for name in names:
        lab = Lab(_lab_of(name, state_dir))
        if purge:
            _guard(lambda n=name, lab=lab: lab.destroy(n))  # type: ignore[misc]
            typer.echo(f"{name}: down, disk deleted ({lab.dir})")
        else:
            _guard(lambda n=name, lab=lab: lab.down(n))  # type: ignore[misc]
            typer.echo(f"{name}: down")


@app.command()
def destroy(names: Annotated[list[str], typer.Argument()], state_dir: StateDir = None) -> None:
    """Stop VMs and delete their disks, seeds and logs."""
    lab = Lab(state_dir)
    for name in names:
        _guard(lambda n=name: lab.destroy(n))  # type: ignore[misc]
        typer.echo(f"{name}: destroyed")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    state_dir: StateDir = None,
) -> None:
    """List the VMs and snapshots of every lab (or of --state-dir's) and their disk use."""
    labs = []
    for lab_dir in known_labs(state_dir):
        lab = Lab(lab_dir)
        labs.append((lab, _guard(lab.status), lab.snapshots(), disk_usage(lab.dir)))
    if as_json:
        docs = [{"state_dir": str(lab.dir), "vms": [v.info() for v in vms],
                 "snapshots": snaps, "disk_bytes": size} for lab, vms, snaps, size in labs]
        # The first lab (--state-dir's, else the default one) also at the top level.
        typer.echo(json.dumps({**docs[0], "labs": docs}, indent=2))
        return
    for lab, vms, snaps, size in labs:
        if not vms and not snaps:
            typer.echo(f"no VMs in {lab.dir}" + (f" ({_human(size)} on disk)" if size else ""))
            continue
        typer.echo(f"{lab.dir} ({_human(size)} on disk)")
        for v in vms:
            fwd = " ".join(f"{g}->{h}" for g, h in v.forwards.items())
            typer.echo(f"  {v.name:16} {v.state:8} ssh 127.0.0.1:{v.ssh_port:<6} cpus={v.cpus} "
                       f"mem={v.memory_mib}M numa={v.numa}{' iommu' if v.iommu else ''}"
                       f"{' kernel=hwe' if v.kernel == 'hwe' else ''} "
                       f"{fwd}".rstrip())
        if snaps:
            typer.echo("  snapshots: " + ", ".join(snaps))


# --- which labs exist ---------------------------------------------------------------------

#: The checkout this package runs from (`make demo` and the test sessions keep their labs
#: in its `.lab/`), or None for an installed wheel.
_CHECKOUT = Path(__file__).resolve().parents[3]
_REGISTRY = "labs.txt"  # under the lab cache: labs made with an explicit --state-dir


def _registry() -> Path:
    return lab_paths.cache_root() / _REGISTRY


def _registered() -> list[Path]:
    try:
        lines = _registry().read_text().splitlines()
    except OSError:
        return []
    return [Path(line) for line in lines if line.strip()]


def remember(lab_dir: Path) -> None:
    """Record a lab made outside the usual places, so that status and down see it."""
    lab_dir = lab_dir.absolute()
    if lab_dir == lab_paths.default_state_dir().absolute():
        return
    keep = [p for p in _registered() if p != lab_dir and p.exists()] + [lab_dir]
    with contextlib.suppress(OSError):
        _registry().parent.mkdir(parents=True, exist_ok=True)
        _registry().write_text("".join(f"{p}\n" for p in keep))


def _forget(lab_dir: Path) -> None:
    keep = [p for p in _registered() if p != lab_dir.absolute()]
    with contextlib.suppress(OSError):
        _registry().write_text("".join(f"{p}\n" for p in keep))


def _is_lab(d: Path) -> bool:
    return d.is_dir() and any((d / part).exists() for part in ("vms", "ssh", "snapshots"))


def known_labs(state_dir: Path | None = None) -> list[Path]:
    """`state_dir` alone when given; else the default lab, the labs under the checkout's
    `.lab/` (`make demo`'s `.lab/demo`, test sessions' `.lab/pytest/run-*`) and the labs
    recorded by `lab up --state-dir`. The default lab is listed even when empty."""
    if state_dir is not None:
        return [state_dir.absolute()]
    found = [lab_paths.default_state_dir().absolute()]
    root = _CHECKOUT / ".lab"
    if (_CHECKOUT / "pyproject.toml").is_file() and root.is_dir():
        for d in sorted(root.iterdir()):
            found += [d] if _is_lab(d) else sorted(x for x in d.glob("*") if _is_lab(x))
    found += [d for d in _registered() if _is_lab(d)]
    out: list[Path] = []
    for d in found:
        if d.absolute() not in out:
            out.append(d.absolute())
    return out


def _lab_of(name: str, state_dir: Path | None) -> Path:
    """The lab holding VM `name`: --state-dir's, else the one known lab that has it."""
    labs = known_labs(state_dir)
    if state_dir is not None:
        return labs[0]
    holding = [d for d in labs if (d / "vms" / name / "vm.json").is_file()]
    if len(holding) > 1:
        raise typer.BadParameter(f"VM {name!r} exists in several labs "
                                 f"({', '.join(map(str, holding))}); pick one with --state-dir")
    return holding[0] if holding else labs[0]


def _session_owner(lab_dir: Path) -> int | None:
    """The pid of the live test session that owns a `.lab/pytest/run-<pid>` lab."""
    pid = lab_dir.name.removeprefix("run-")
    if lab_dir.parent.name != "pytest" or not pid.isdigit() or int(pid) == os.getpid():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return int(pid)


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under `path` (sparse disk images count what they use)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    state_dir: StateDir = None,
) -> None:
    """Open a shell on a VM, or run `-- CMD...` there."""
    lab = Lab(state_dir)
    vm = _guard(lambda: lab.vm(name))
    if not vm.running:
        typer.echo(f"error: VM {name!r} is not running; start it with `gpunode lab up {name}`",
                   err=True)
        raise typer.Exit(1)
    args = list(ctx.args)
    if args and args[0] == "--":
        args = args[1:]
    command = " ".join(args) if args else None
    argv = vm.ssh_argv(command, tty=command is None and sys.stdin.isatty())
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@app.command()
def reset(name: Annotated[str, typer.Argument()], state_dir: StateDir = None) -> None:
    """Give the VM a pristine disk (restarts it if it was running)."""
    vm = _guard(lambda: Lab(state_dir).reset(name))
    typer.echo(f"{name}: reset ({vm.state})")


@app.command()
def reboot(name: Annotated[str, typer.Argument()], state_dir: StateDir = None) -> None:
    """Reboot the guest and wait for SSH."""
    _guard(lambda: Lab(state_dir).reboot(name))
    typer.echo(f"{name}: rebooted")


@app.command()
def snapshot(
    name: Annotated[str, typer.Argument()],
    snap: Annotated[str, typer.Argument()],
    state_dir: StateDir = None,
) -> None:
    """Power the VM off cleanly and freeze its disk as snapshot SNAP."""
    path = _guard(lambda: Lab(state_dir).snapshot(name, snap))
    typer.echo(f"{snap}: snapshot of {name} at {path}")


@app.command()
def fork(
    snap: Annotated[str, typer.Argument()],
    name: Annotated[str, typer.Argument()],
    state_dir: StateDir = None,
) -> None:
    """Start a new VM NAME from snapshot SNAP."""
    if state_dir is not None:
        remember(state_dir)
    vm = _guard(lambda: Lab(state_dir).fork(snap, name))
    typer.echo(f"{vm.name}: up from {snap}, ssh {vm.user}@{vm.address} -p {vm.ssh_port}")


@app.command()
def site(
    out: Annotated[Path, typer.Option("--out", help="Site YAML to write")],
    base: Annotated[Path | None, typer.Option("--base", help="Site YAML to merge into")] = None,
    state_dir: StateDir = None,
) -> None:
    """Write a gpunode site file with connections to the running VMs."""
    base_doc: dict[str, Any] | None = None
    if base is not None:
        try:
            base_doc = yaml.safe_load(base.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            typer.echo(f"error: cannot read --base {base}: {exc}", err=True)
            raise typer.Exit(2) from None
        if not isinstance(base_doc, dict):
            typer.echo(f"error: --base {base}: expected a mapping at the top level", err=True)
            raise typer.Exit(2)
    path = _guard(lambda: Lab(state_dir).write_site(out, base_doc))
    typer.echo(f"wrote {path}")


@app.command()
def deps(
    install: Annotated[bool, typer.Option("--install", help="apt-get install what is missing")]
    = False,
) -> None:
    """Check (and with --install, install) the host packages the lab needs."""
    installed = _guard(lambda: lab_deps.ensure(install))
    typer.echo(f"installed: {' '.join(installed)}" if installed else "lab dependencies: ok")


@app.command("image")
def image_cmd(
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build even when cached")] = False,
    os_name: Annotated[str, typer.Option(
        "--os", help=f"Guest OS: {', '.join(lab_image.LAB_OS)}")] = "debian-12",
    kernel: Annotated[str, typer.Option(
        "--kernel", help="generic (the release's own kernel) or hwe (Ubuntu's HWE kernel)")]
    = "generic",
) -> None:
    """Build an OS's base image (cached by recipe hash) and print its path."""
    path = _guard(lambda: lab_image.ensure_image(rebuild=rebuild, os_name=os_name,
                                                 kernel=kernel))
    typer.echo(str(path))


if __name__ == "__main__":
    app()
