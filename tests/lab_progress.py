"""pytest plugin for `make test`: progress lines while the lab is busy.

The integration tests spend most of their time in a few session fixtures (the lab image,
booting VMs, two fresh deploys: ~10 minutes before the first of them reports anything).
This plugin prints a line when an integration fixture wider than one test (session,
module) starts setting up and when it is ready (with its duration), and a line every
`--progress-every` seconds (default 60) while a fixture or a test is still running, so a
log shows movement from the first minute.

Loaded by the Makefile: `PYTHONPATH=tests pytest -p lab_progress ...`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

_state: dict[str, object] = {"what": None, "since": 0.0}
_lock = threading.Lock()
_started = time.monotonic()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--progress-every", type=float, default=60.0,
                     help="seconds between 'still running' lines (0: none)")


def _clock() -> str:
    elapsed = int(time.monotonic() - _started)
    return f"[{elapsed // 60:02d}:{elapsed % 60:02d}]"


def _say(config: pytest.Config, text: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with _lock, (capture.global_and_fixture_disabled() if capture is not None
                 else contextlib.nullcontext()):
        reporter.ensure_newline()
        reporter.write_line(f"{_clock()} {text}")


def _busy(what: str | None) -> None:
    _state["what"], _state["since"] = what, time.monotonic()


def _heartbeat(config: pytest.Config, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        what, since = _state["what"], float(_state["since"])  # type: ignore[arg-type]
        if what:
            _say(config, f"... still in {what} ({time.monotonic() - since:.0f} s)")


def pytest_configure(config: pytest.Config) -> None:
    every = config.getoption("--progress-every")
    if every and every > 0:
        stop = threading.Event()
        thread = threading.Thread(target=_heartbeat, args=(config, every, stop), daemon=True)
        thread.start()
        config.add_cleanup(stop.set)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest
                         ) -> Iterator[None]:
    wide = fixturedef.scope != "function" and "integration" in (fixturedef.baseid or "")
    name = f"fixture {fixturedef.argname}"
    if wide:
        _say(request.config, f"setting up {name} ({fixturedef.scope})")
        previous = _state["what"]
        _busy(name)
    started = time.monotonic()
    yield
    if wide:
        _say(request.config, f"{name} ready after {time.monotonic() - started:.0f} s")
        _busy(previous)  # type: ignore[arg-type]


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    # Lab tests only: the line is written from another thread with output capture paused,
    # which a unit test reading its own captured output (capsys) must not meet.
    _busy(nodeid if "integration" in nodeid else None)


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _busy(None)
