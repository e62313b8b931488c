"""ansible-lint (production profile, offline) passes on the roles and playbooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("ansible-lint")


@pytest.mark.skipif(not LINT.exists(), reason="ansible-lint is not installed in this venv")
def test_ansible_lint_production_profile_passes():
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "NO_COLOR": "1",
           "PATH": f"{LINT.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(LINT), "--offline", "--profile", "production", "--format",
                           "pep8", "--nocolor", "roles", "playbooks"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stderr + proc.stdout
