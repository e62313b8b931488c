"""gpunode's pyinfra operations. Each reads the host through ONE cached snapshot
(gpunode.facts) and yields commands only when the host differs from the profile, so a
converged host costs one remote command per run. An operation that changes something
drops the cache (at execution time) and records a tag, so later operations re-read the
host and can react (restart a unit whose files changed, reload systemd, ...)."""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections import defaultdict
from collections.abc import Callable
from io import StringIO
from pathlib import PurePosixPath
from typing import Any

import gevent
from pyinfra import host
from pyinfra.api import (
    FileUploadCommand,
    FunctionCommand,
    OperationError,
    StringCommand,
    operation,
)
from pyinfra.connectors.util import clear_askpass_cache, remove_any_sudo_askpass_file

from gpunode.core import desired, hostcmd
from gpunode.core.files import ManagedFile
from gpunode.core.hostcmd import (
    STAMP_COMMANDS,
    apt_get,
    apt_mark,
    stamped_command,
)
from gpunode.core.paths import stamp_path
from gpunode.core.plan import (
    daemon_reload_stale,
    dir_differs,
    file_step,
    find,
    planner,
    reboot_message,
    reboot_refusal,
    sha256,
    stale_driver,
    stale_services,
    todo,
    unheld,
    unit_state,
)
from gpunode.engines.pyinfra import STOP_PREFIX
from gpunode.facts import NodeSnapshot, Snapshot, node_spec, reboot_reasons
from gpunode.model import NodeProfile

_CACHE: dict[str, Snapshot] = {}
_CHANGED: dict[str, set[str]] = defaultdict(set)
logger = logging.getLogger("pyinfra")
# The reboot wait: first try after REBOOT_DELAY_S, then every REBOOT_INTERVAL_S; one probe
# (connect, read the boot id) gives up after REBOOT_PROBE_S.
REBOOT_DELAY_S, REBOOT_INTERVAL_S, REBOOT_PROBE_S = 5, 2, 30


def snapshot(p: NodeProfile) -> Snapshot:
    snap = _CACHE.get(host.name)
    if snap is None:
        spec = node_spec(p)
        data = host.get_fact(NodeSnapshot, spec_json=json.dumps(spec, sort_keys=True))
        snap = _CACHE[host.name] = Snapshot(data)
    return snap


def changing(tag: str, wrote: dict[str, Any] | None = None) -> None:
    """Record a change about to execute; later operations re-read the host. A change that
    only writes one file or directory (`wrote`: its snapshot entry as it will be) patches
    the cached snapshot instead: a re-read costs seconds on a slow host, and a fresh deploy
    writes dozens of files. Whatever a write implies elsewhere (a unit needing a reload, apt
    lists to refresh) is decided from the recorded tags (`changed`), not from the snapshot."""
    if host.state.is_executing:
        _CHANGED[host.name].add(tag)
        snap = _CACHE.get(host.name)
        if wrote is not None and snap is not None:
            snap.wrote(wrote)
        else:
            _CACHE.pop(host.name, None)


def _wrote(path: str, content: str, mode: int, owner: str, group: str) -> dict[str, Any]:
    return {path: {"mode": f"{mode:04o}", "owner": owner, "group": group,
                   "sha256": sha256(content)}}


def changed(*tags: str) -> bool:
    return any(t in _CHANGED[host.name] for t in tags)


def file_differs(snap: Snapshot, path: str, content: str, mode: int, owner: str,
                 group: str) -> bool:
    return file_step("", snap, path, content, f"{mode:04o}", owner, group).needed


def _upload(path: str, content: str, mode: int, owner: str, group: str):
    """Upload through a private staging directory (secrets are never world-readable)."""
    user = host.data.get("ssh_user") or "root"
    staging = f"/tmp/.gpunode-{user}"
    parent = str(PurePosixPath(path).parent)
    yield StringCommand(f"install -d -m 700 -o {shlex.quote(user)} {staging} && "
                        f"mkdir -p {shlex.quote(parent)}")
    yield FileUploadCommand(StringIO(content), path,
                            remote_temp_filename=f"{staging}/{sha256(path)[:16]}")
    yield StringCommand(f"chown {owner}:{group} {shlex.quote(path)} && "
                        f"chmod {mode:o} {shlex.quote(path)}")


@operation()
def managed_file(p: NodeProfile, f: ManagedFile):
    """Make one gpunode-rendered file exactly as rendered (content, mode, owner)."""
    if file_differs(snapshot(p), f.path, f.content, f.mode, f.owner, f.group):
        changing(f.path, _wrote(f.path, f.content, f.mode, f.owner, f.group))
        yield from _upload(f.path, f.content, f.mode, f.owner, f.group)


@operation()
def secret_file(p: NodeProfile, path: str, content: str, group: str = "root"):
    """A 0600 secret (API key): content is never printed, diffed or put on a command line."""
    if file_differs(snapshot(p), path, content, 0o600, "root", group):
        changing(path, _wrote(path, content, 0o600, "root", group))
        yield from _upload(path, content, 0o600, "root", group)


@operation()
def absent(p: NodeProfile, paths: list[str]):
    present = [path for path in paths if snapshot(p).file(path)]
    if present:
        changing("absent:" + ",".join(present))
        yield StringCommand("rm -rf " + " ".join(shlex.quote(x) for x in present))


@operation()
def apt_update(p: NodeProfile, when_changed: tuple[str, ...]):
    """apt-get update when a source or key changed in this run."""
    if changed(*when_changed):
        changing("apt-update")
        yield StringCommand(apt_get(p, "update"))


@operation()
def apt_install(p: NodeProfile, packages: list[desired.Pkg], unhold: bool = False,
                check: Callable[[NodeProfile, Snapshot], str | None] | None = None):
    """Install packages (at exact versions where given); unhold first when a held
    package must change version, then hold it again. `check` (a plan.py function) gives a
    command that must succeed first, or None."""
    snap = snapshot(p)
    missing = set(todo(snap, [pkg.spec for pkg in packages]))
    pkgs = [pkg for pkg in packages if pkg.spec in missing]
    if not pkgs:
        return
    first = check(p, snap) if check else None
    changing("apt:" + ",".join(pkg.name for pkg in pkgs))
    if first:
        yield StringCommand(first)
    held = [pkg.name for pkg in pkgs if pkg.name in snap.holds]
    specs = " ".join(shlex.quote(pkg.spec) for pkg in pkgs)
    if held:
        yield StringCommand(apt_mark(p, "unhold", held))
    yield StringCommand(apt_get(p, f"install --allow-change-held-packages {specs}"))
    if held:
        yield StringCommand(apt_mark(p, "hold", held))


@operation()
def apt_hold(p: NodeProfile, names: list[str]):
    missing = unheld(snapshot(p), names)
    if missing:
        changing("hold")
        yield StringCommand(apt_mark(p, "hold", missing))


@operation()
def hold_driver(p: NodeProfile):
    """Hold every installed package of the driver branch (decided at execution time)."""
    snap = snapshot(p)
    missing = unheld(snap, desired.driver_hold_set(p, snap.packages))
    if missing:
        changing("hold")
        yield StringCommand(apt_mark(p, "hold", missing))


@operation()
def driver_to_version(p: NodeProfile):
    """Move every installed driver package to the pinned version (upgrade/downgrade):
    release holds, install at the preferences' candidate, hold again."""
    stale = stale_driver(p, snapshot(p))
    if not stale:
        return
    changing("driver-version")
    yield StringCommand(hostcmd.driver_to_version(p, stale))


def decide(value: bool | Callable[[Snapshot], bool], p: NodeProfile) -> bool:
    """A decision made at execution time from the current snapshot (or a constant)."""
    return value(snapshot(p)) if callable(value) else bool(value)


@operation()
def stamped(p: NodeProfile, stamp_name: str, key: str | Callable[[Snapshot], str | None],
            force: Callable[[Snapshot], bool] | None = None):
    """Run the stamp's command (hostcmd.STAMP_COMMANDS) once per value of `key` (a stamp
    file records the last success), so an interrupted run repeats it next time. A key of
    None means: not now; `force` runs it whatever the stamp says (what it made is gone)."""
    key = key(snapshot(p)) if callable(key) else key
    stamp = stamp_path(stamp_name)
    if key is not None and (file_differs(snapshot(p), stamp, key + "\n", 0o644, "root", "root")
                            or (force is not None and force(snapshot(p)))):
        changing(f"stamp:{stamp_name}")
        yield StringCommand(stamped_command(STAMP_COMMANDS[stamp_name], stamp_name, key))


@operation()
def run_when(p: NodeProfile, command: str, needed: bool | Callable[[Snapshot], bool], tag: str):
    """Run a command when `needed` (a constant, or decided at execution from the snapshot)."""
    if decide(needed, p):
        changing(tag)
        yield StringCommand(command)


@operation()
def daemon_reload(p: NodeProfile, unit_paths: list[str]):
    if changed(*unit_paths) or daemon_reload_stale(p, snapshot(p)):
        changing("daemon-reload")
        yield StringCommand("systemctl daemon-reload")


@operation()
def unit(p: NodeProfile, unit_name: str, enabled: bool = True,
         running: bool | None | Callable[[Snapshot], bool] = True,
         restart_when: tuple[str, ...] = (),
         wanted_by: str | None = None):
    """Unit enabled/running as asked, restarted when one of its inputs changed. `running`:
    True start, False stop, None leave it alone; a callable decides at execution time
    whether it may start now (the GPUs answer), and leaves it alone when not: a host whose
    nvidia-smi fails keeps its units as they are, as the Ansible roles do. `wanted_by`
    enables units without an [Install]."""
    name = unit_name
    state = unit_state(snapshot(p), name)
    if callable(running):
        running = True if decide(running, p) else None
    active = state["active"]
    if wanted_by and not snapshot(p).wanted(wanted_by, name):
        changing(f"unit:{name}")
        yield StringCommand(f"systemctl add-wants {wanted_by} {name}")
    elif not wanted_by and enabled and not state["enabled"]:
        changing(f"unit:{name}")
        yield StringCommand(f"systemctl enable {name}")
    if not enabled and state["enabled"]:
        changing(f"unit:{name}")
        yield StringCommand(f"systemctl disable {name}")
    if running and (not active or changed(*restart_when)):
        changing(f"unit:{name}")
        yield StringCommand(f"systemctl {'restart' if active else 'start'} {name}")
    if running is False and active:
        changing(f"unit:{name}")
        yield StringCommand(f"systemctl stop {name}")


def _stop(message: str) -> FunctionCommand:
    """A command that fails this operation with `message` logged against the host: pyinfra
    then skips the host's remaining operations, other hosts continue (raising from the
    command generator instead would print a traceback)."""

    def report(state, host) -> bool:  # noqa: ARG001 - pyinfra passes both by name
        host.log_styled(STOP_PREFIX + message, fg="red", log_func=logger.error)
        return False

    return FunctionCommand(report, (), {})


@operation()
def refuse(p: NodeProfile, check: Callable[[NodeProfile, Snapshot], str | None]):
    """Stop this host when `check` (a plan.py function, decided at execution time from the
    snapshot as changed so far) gives a message."""
    message = check(p, snapshot(p))
    if message:
        yield _stop(message)


@operation()
def fail(message: str):
    """Stop this host with a message (other hosts continue)."""
    yield _stop(message)


@operation()
def reboot_if_needed(p: NodeProfile):
    """Reboot when the host needs it and the node's policy allows; otherwise stop this host
    with the reasons (exit 1), after everything that was safe to do. Never into a kernel
    without the NVIDIA module (plan.reboot_refusal)."""
    reasons = reboot_reasons(p, snapshot(p))
    if not reasons:
        return
    refusal = reboot_refusal(p, snapshot(p), reasons)
    if refusal:
        yield _stop(refusal)
        return
    if p.reboot == "never":
        yield _stop(reboot_message(p, reasons))
        return
    yield from _reboot("; ".join(reasons), p.reboot_timeout_s,
                       before="systemctl stop 'vllm@*.service' || true")


def _reboot(why: str, timeout_s: int, before: str | None = None):
    """Reboot, wait for the host to answer again, and read it afresh next time."""
    changing("reboot")
    host.log(f"rebooting: {why}")
    if before:
        yield StringCommand(before)
    booted: list[str] = []
    # (pyinfra passes state and host to a function only when its parameters have those names)
    yield FunctionCommand(_read_boot_id, (booted,), {})
    # a sudo password file would not survive the reboot (pyinfra's server.reboot does the same)
    yield FunctionCommand(lambda state, host: remove_any_sudo_askpass_file(host), (), {})
    yield StringCommand("( sleep 1 && reboot ) </dev/null >/dev/null 2>&1 &")
    yield FunctionCommand(_wait_for_new_boot, (booted, timeout_s), {})
    _CACHE.pop(host.name, None)


def _read_boot_id(state: Any, host: Any, into: list[str]) -> None:
    now = _boot_id(host)
    if not now:
        raise OperationError(f"{host.name}: could not read its boot id before the reboot")
    into.append(now)


def _boot_id(host: Any) -> str | None:
    """The host's boot id, or None when it does not answer (connecting included) within
    REBOOT_PROBE_S: refused, reset, or a channel that never opens."""
    with gevent.Timeout(REBOOT_PROBE_S, False):
        try:
            host.connect(show_errors=False)
            if not host.connected:
                return None
            ok, out = host.run_shell_command(StringCommand("cat /proc/sys/kernel/random/boot_id"))
        except Exception:  # the host is not (or no longer) answering
            return None
        return out.stdout.strip() if ok else None
    return None


def _wait_for_new_boot(state: Any, host: Any, booted: list[str], timeout_s: int) -> None:
    """Wait until the host answers with another boot id. Every try is a new connection that
    is dropped unless the new boot answered: one that reached the old system while it shut
    down can hang (its channel never opens), and pyinfra's own reboot wait kept such a
    connection and asked it again."""
    deadline = time.monotonic() + timeout_s
    time.sleep(REBOOT_DELAY_S)
    clear_askpass_cache(host)
    host.disconnect()
    while time.monotonic() < deadline:
        now = _boot_id(host)
        if now and now != booted[0]:
            return
        host.disconnect()
        time.sleep(REBOOT_INTERVAL_S)
    raise OperationError(f"{host.name} did not come back from its reboot within {timeout_s} s "
                         "(reboot_timeout_s)")


@operation()
def placement_file(p: NodeProfile, path: str,
                   build: Callable[[Snapshot], ManagedFile | None]):
    """A file whose content depends on host facts read at execution time (GPU UUIDs,
    GPU-local CPUs); `build` returns None when the facts are not available yet."""
    f = build(snapshot(p))
    if f is not None and file_differs(snapshot(p), f.path, f.content, f.mode, f.owner, f.group):
        changing(f.path, _wrote(f.path, f.content, f.mode, f.owner, f.group))
        yield from _upload(f.path, f.content, f.mode, f.owner, f.group)


@operation()
def directory(p: NodeProfile, path: str, mode: int, owner: str, group: str):
    if dir_differs(snapshot(p), path, f"{mode:04o}", owner, group):
        changing(path, {path: {"mode": f"{mode:04o}", "owner": owner, "group": group,
                               "dir": True}})
        yield StringCommand(f"install -d -m {mode:o} -o {owner} -g {group} {shlex.quote(path)}")


@operation()
def remove_stale_services(p: NodeProfile):
    """Services with a config in /etc/vllm but no longer in the profile: stop, remove."""
    for name in stale_services(p, snapshot(p)):
        changing(f"removed:{name}")
        for command in hostcmd.remove_service(name):
            yield StringCommand(command)


@operation()
def plan_step(p: NodeProfile, concern: str, key: str):
    """Execute one step of a concern's plan (gpunode.core.plan), re-planned at execution time on
    the host as it is then: the plan decides, this only carries it out."""
    step = find(planner(concern)(p, snapshot(p)), key)
    if step is None or not step.needed:
        return
    if step.kind == "stop":
        yield _stop(step.message)
    elif step.kind == "file":
        mode = int(step.mode, 8)
        changing(step.path, _wrote(step.path, step.content, mode, step.owner, step.group))
        yield from _upload(step.path, step.content, mode, step.owner, step.group)
    elif step.kind == "command":
        changing(step.key)
        yield StringCommand(step.command)
    elif step.kind == "reboot":
        yield from _reboot(step.why, step.timeout_s)


@operation()
def plan_verify(p: NodeProfile, concern: str):
    """After the steps (and a reboot): stop the host if its plan now says it must."""
    for step in planner(concern)(p, snapshot(p)):
        if step.kind == "stop" and step.needed:
            yield _stop(step.message)
            return
