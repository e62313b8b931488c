"""Helpers for converged lab nodes: the gpunode CLI as a subprocess, and what a converged
node IS as one comparable document (for the engine parity test): one snapshot command (the
deploy's own fact) plus two systemctl listings: managed files with content hash and mode,
installed package versions and holds, unit states, sysctl values, kernel command line, THP,
modules, users, venvs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpunode.cli.deploy import HostResult, ansible_env, run_pyinfra
from gpunode.facts import node_spec, snapshot_command
from gpunode.model import NodeProfile

REPO = Path(__file__).resolve().parents[2]
#: Units whose state belongs to the comparison (besides the profile's own).
UNIT_PATTERNS = ("nvidia", "vllm", "gpunode", "irqbalance", "docker", "containerd", "dcgm")
RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
                   r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)", re.M)
#: Values that differ per VM by nature.
HOST_SPECIFIC = ("MainPID",)


#: The OS of the converged pair: the one most users run on their GPU hosts. Debian 12's GPU
#: node path runs in `make test` through the Proxmox end-to-end test (full deploy and checks)
#: and converges as the pair does in `make test-matrix` (test_other_os.py).
CONVERGED_OS = "ubuntu-24.04"
# Every pyinfra run of the lab tests is bounded: a hung one fails its test, naming the
# operation it was in, instead of holding CI (a fresh deploy takes about 20 minutes here).
DEPLOY_TIMEOUT_S = 2400


def ubuntu_archive_unreachable() -> str:
    """Why no Ubuntu guest can be built here ("" when one can): Ubuntu's archive keyring
    (image.ubuntu_keyring) cannot be fetched. Ubuntu guest tests skip with it."""
    from gpunode.lab import image
    from gpunode.lab.errors import LabError

    try:
        image.ubuntu_keyring()
    except LabError as exc:
        if "cannot be reached" in str(exc):
            return str(exc)
        raise
    return ""


def converged_os() -> tuple[str, str]:
    """The converged pair's OS, and why it is not CONVERGED_OS ("" when it is): without
    Ubuntu's archive no Ubuntu guest can be built, and the pair runs on Debian 12 instead
    (the Ubuntu-specific test then skips with that reason)."""
    wanted = os.environ.get("GPUNODE_TEST_CONVERGED_OS", CONVERGED_OS)
    if wanted.startswith("ubuntu") and (why := ubuntu_archive_unreachable()):
        return "debian-12", why
    return wanted, "" if wanted == CONVERGED_OS else f"$GPUNODE_TEST_CONVERGED_OS={wanted}"


def gpunode_cli(*args: str, timeout: float = 1800) -> tuple[int, str, float]:
    """`gpunode ARGS...` in the repository: (exit code, output, seconds)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gpunode.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, round(time.monotonic() - started, 1)


def lab_via() -> str:
    """`gpunode lock --via`: the lab's mirrors are 10.0.2.2 to guests, 127.0.0.1 here."""
    from gpunode.lab.sim.repo import GUEST_HOST, default_port

    port = int(os.environ.get("GPUNODE_LAB_HTTP_PORT") or default_port())
    return f"http://{GUEST_HOST}:{port}=http://127.0.0.1:{port}"


def lock(site: Path, *update: str) -> dict[str, Any]:
    """`gpunode lock` from the lab's SIMULATED mirrors (`--update` with `update`, when given):
    the lock file's nodes."""
    import yaml

    extra = ("--update", *update) if update else ()
    rc, out, _ = gpunode_cli("lock", "--site", str(site), "--via", lab_via(), *extra,
                             timeout=600)
    assert rc == 0, out
    return yaml.safe_load(site.with_suffix(".lock").read_text())["nodes"]


def drift(site: Path, node: str) -> tuple[int, list[dict[str, Any]]]:
    """`gpunode drift NODE --json`: (exit code, findings)."""
    rc, out, _ = gpunode_cli("drift", node, "--json", "--site", str(site), timeout=600)
    start = out.index("{")
    return rc, json.loads(out[start:out.rindex("}") + 1])["findings"]


def manifest(site: Path, node: str) -> dict[str, Any]:
    """`gpunode manifest NODE --json`."""
    rc, out, _ = gpunode_cli("manifest", node, "--json", "--site", str(site), timeout=300)
    assert rc == 0, out
    return json.loads(out[out.index("{"):])


def state_dump(vm: Any, p: NodeProfile) -> dict[str, Any]:
    data = json.loads(vm.check("sudo " + snapshot_command(node_spec(p)), timeout=300))
    listing = vm.check("systemctl list-unit-files --no-legend --no-pager --state=enabled; "
                       "echo ==; systemctl list-units --no-legend --no-pager --plain "
                       "--state=active", timeout=120)
    enabled, active = listing.split("==\n")
    keep = lambda name: any(pat in name for pat in UNIT_PATTERNS)  # noqa: E731
    return {
        # when a file was written differs per host; what it holds does not
        "files": {path: info and {k: v for k, v in info.items() if k != "mtime"}
                  for path, info in data["files"].items()},
        "packages": data["packages"],
        "holds": data["holds"],
        "units": {u: {k: v for k, v in props.items() if k not in HOST_SPECIFIC}
                  for u, props in data["units"].items()},
        "enabled": sorted(line.split()[0] for line in enabled.splitlines()
                          if line and keep(line.split()[0])),
        "active": sorted(line.split()[0] for line in active.splitlines()
                         if line and keep(line.split()[0])),
        "sysctl": data["sysctl"],
        "cmdline": [t for t in data["cmdline"].split()
                    if not t.startswith(("BOOT_IMAGE=", "root="))],
        "thp": data["thp"],
        "modules": data["modules"],
        "users": data["users"],
        "venvs": data["venvs"],
        "pci_drivers": {a: d["driver"] for a, d in data.get("pci", {}).get("devices", {}).items()},
    }


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Every difference between two dumps (a: pyinfra's node, b: Ansible's), one per line."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{path}/{key}: {'pyinfra only' if key in a else 'ansible only'}"
                           f" ({a.get(key, b.get(key))!r})")
            else:
                out += diff(a[key], b[key], f"{path}/{key}")
        return out
    return [] if a == b else [f"{path}: pyinfra {a!r} != ansible {b!r}"]


def ansible_playbook(site: Path, node: str, *extra: str,
                     playbook: str = "playbooks/gpu_node.yml") -> tuple[int, str, float]:
    env = {**ansible_env(site), "ANSIBLE_NOCOLOR": "1"}
    started = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")),
                           playbook, "--limit", node, *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def recap(output: str, node: str) -> dict[str, int]:
    for m in RECAP.finditer(output):
        if m.group("host") == node:
            return {k: int(v) for k, v in m.groupdict().items() if k != "host"}
    raise AssertionError(f"no PLAY RECAP line for {node}:\n{output[-3000:]}")


def changed_tasks(output: str) -> list[str]:
    """Names of tasks that reported `changed` (for a readable failure)."""
    tasks, current = [], ""
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            current = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif line.startswith("changed:"):
            tasks.append(current)
    return tasks


def pyinfra(site: Path, hosts: list[str], entry: str = "gpu_node"
            ) -> tuple[int, dict[str, HostResult], float]:
    """run_pyinfra, bounded by DEPLOY_TIMEOUT_S."""
    return run_pyinfra(site, hosts, entry=entry, timeout_s=DEPLOY_TIMEOUT_S)
