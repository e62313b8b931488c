"""`make test` as the README describes it: progress from the first minute (the
tests/lab_progress.py plugin the Makefile loads) and no skip a user cannot act on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SLOW_SESSION = '''
import time
import pytest

@pytest.fixture(scope="session")
def booted_vm():
    time.sleep(2.5)

def test_uses_the_vm(booted_vm):
    time.sleep(1.5)
'''


def test_progress_plugin_reports_fixtures_and_long_tests(tmp_path: Path) -> None:
    (tmp_path / "integration").mkdir()
    (tmp_path / "integration" / "test_slow.py").write_text(SLOW_SESSION)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "lab_progress", "--progress-every", "1", "-v",
         "-p", "no:cacheprovider", "integration"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"\[00:0\d\] setting up fixture booted_vm \(session\)", out), out
    assert re.search(r"\[00:0\d\] \.\.\. still in fixture booted_vm \(\d s\)", out), out
    assert re.search(r"fixture booted_vm ready after [23] s", out), out
    assert "... still in integration/test_slow.py::test_uses_the_vm" in out, out


def test_makefile_loads_the_plugin_and_reports_skips() -> None:
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert recipe, "Makefile has no test target"
    text = recipe.group(1)
    assert "-p lab_progress" in text and "PYTHONPATH=tests" in text
    assert "-rs" in text  # skip reasons are listed at the end of the run
