"""Issue 14's invariant, by grep: the engines (the pyinfra deploys and the Ansible side's
controller code and roles) read no snapshot keys and make none of the host-dependent
decisions gpunode.core.plan makes once for both. Each pattern below is one such decision or raw
read as it was written twice before; a new one in an engine fails here."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINES = [*sorted((REPO / "src/gpunode/engines/pyinfra").glob("*.py")),
           REPO / "src/gpunode/engines/ansible/plan.py"]
ROLES = sorted((REPO / "roles").glob("*/tasks/*.yml"))

# pattern -> what belongs in gpunode.core.plan (or gpunode.facts.Snapshot) instead
IN_PYTHON = {
    r"(?<!host)\.data\[|(?<!host)\.data\.get\(|\bdata\[\"": "a raw snapshot key",
    r"ActiveState|UnitFileState|NeedDaemonReload|LoadState": "unit state (plan.unit_state)",
    r"\.split\(\":\"\)": "package version parsing (plan.stale_driver, plan.todo)",
    r"p\.nvidia\.branch": "driver branch matching (plan.stale_driver)",
    r"[\"']sources\.list\.d": "apt source detection (ManagedFile.apt_source)",
    r"not in snap\.holds|in snap\.holds\b(?!\])": "hold state (plan.unheld)",
}
IN_ROLES = {
    r"'search'": "a path pattern (ManagedFile.apt_source / systemd_unit)",
    r"gpunode\.(virt|cpufreq|driver_installed|gpu_drift|governor_differs)\b":
        "a snapshot field tested in Jinja (plan.secure_boot, governor_*, gpu_settings_needed)",
    r"dpkg_unfinished \| length": "a list tested in Jinja (plan.dpkg_unfinished)",
}


def _hits(files: list[Path], patterns: dict[str, str]) -> list[str]:
    out = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for pattern, belongs in patterns.items():
                if re.search(pattern, line):
                    out.append(f"{path.relative_to(path.parents[2])}:{n}: {belongs}: {line.strip()}")
    return out


def test_engine_modules_read_no_snapshot_keys_and_decide_nothing():
    assert _hits(ENGINES, IN_PYTHON) == []


def test_roles_test_decisions_not_snapshot_fields():
    assert _hits(ROLES, IN_ROLES) == []


def test_the_patterns_find_what_they_forbid(tmp_path: Path):
    """The check itself can fail: the old forms of each decision are found."""
    old = tmp_path / "old.py"
    old.write_text('x = snap.data["sysctl"]\n'
                   'y = state.get("ActiveState")\n'
                   'z = v.split(":")[-1].startswith(f"{p.nvidia.branch}.")\n'
                   'w = [n for n in names if n not in snap.holds]\n'
                   'u = "sources.list.d" in f.path\n')
    assert len(_hits([old], IN_PYTHON)) == 5 + 1   # line 3 holds two
    role = tmp_path / "main.yml"
    role.write_text("  when: ansible_facts.gpunode.cpufreq\n"
                    "    | select('search', 'sources.list.d|preferences')\n")
    assert len(_hits([role], IN_ROLES)) == 2
