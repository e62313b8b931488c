"""The pyinfra deploy's wait for a rebooting host (deploys/ops.py): every try is a new
connection, one that reached the old system is dropped, and a probe that hangs (a channel
the dying host never opens) is given up after REBOOT_PROBE_S instead of blocking the run."""

from __future__ import annotations

from types import SimpleNamespace

import gevent
import pytest
from pyinfra.api import FunctionCommand, OperationError, StringCommand

from gpunode.engines.pyinfra import ops

OLD, NEW = "0ld-b00t", "n3w-b00t"


class RebootingHost:
    """A host whose connections answer, in turn, as scripted: a boot id, or "hang"."""

    def __init__(self, answers: list[str]) -> None:
        self.name, self.answers, self.connected = "gpu-a", list(answers), False
        self.connections, self.asked_on_this_connection = 0, 0
        self.connector_data: dict[str, str] = {}

    def connect(self, show_errors: bool = True) -> None:
        if not self.connected:
            self.connected, self.asked_on_this_connection = True, 0
            self.connections += 1

    def disconnect(self) -> None:
        self.connected = False

    def run_shell_command(self, command, **_):
        self.asked_on_this_connection += 1
        if self.asked_on_this_connection > 1:  # the old system's connection, asked again
            gevent.sleep(3600)
        answer = self.answers.pop(0) if self.answers else OLD
        if answer == "hang":
            gevent.sleep(3600)
        return True, SimpleNamespace(stdout=answer + "\n")


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(ops, "REBOOT_DELAY_S", 0)
    monkeypatch.setattr(ops, "REBOOT_INTERVAL_S", 0)
    monkeypatch.setattr(ops, "REBOOT_PROBE_S", 0.05)


def test_the_old_system_answering_is_dropped_and_a_hung_probe_given_up():
    h = RebootingHost([OLD, OLD, "hang", NEW])
    ops._wait_for_new_boot(None, h, [OLD], timeout_s=30)
    assert h.connections == 4 and h.connected       # one connection per try, the last kept


def test_the_reboot_runs_through_pyinfra_as_written(monkeypatch):
    """The reboot's commands executed the way pyinfra executes them (FunctionCommand passes
    state and host only to functions whose parameters have those names: the first version
    named it `h`, and every lab reboot failed with a TypeError)."""
    h = RebootingHost([OLD, OLD, NEW])
    h.connected = True
    monkeypatch.setattr(ops, "host", SimpleNamespace(
        name=h.name, log=lambda *a: None, state=SimpleNamespace(is_executing=False)))
    ran = []
    for command in ops._reboot("a test", timeout_s=30, before="systemctl stop x"):
        if isinstance(command, FunctionCommand):
            command.execute(None, h, {})
        else:
            assert isinstance(command, StringCommand)
            ran.append(str(command))
    assert ran == ["systemctl stop x", "( sleep 1 && reboot ) </dev/null >/dev/null 2>&1 &"]
    assert h.connected and h.connections == 2   # after the open one: the old system, the new


def test_a_host_that_never_comes_back_fails_naming_it():
    h = RebootingHost([])
    with pytest.raises(OperationError, match="gpu-a did not come back .* within 0 s"):
        ops._wait_for_new_boot(None, h, [OLD], timeout_s=0)


def test_the_boot_id_before_the_reboot_is_required():
    h = RebootingHost(["hang"])
    h.connected = True
    with pytest.raises(OperationError, match="gpu-a: could not read its boot id"):
        ops._read_boot_id(None, h, [])
