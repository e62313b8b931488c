"""State parity and idempotence of the Ansible roles against the pyinfra deploy, on two
fresh lab VMs (SIMULATED NVIDIA stack, real Debian 12, real systemd/apt/sysctl/GRUB):

1. VM A converged by pyinfra (`gpunode deploy`), VM B by Ansible
   (`gpunode deploy --engine ansible`); both pass `gpunode check`;
2. a state dump of each (managed files with content hash and mode, installed package
   versions and holds, enabled and active units, sysctl values, kernel command line)
   differs only in host-specific values;
3. a second ansible-playbook run reports changed=0, and `--check --diff` reports no change.

VM A is the session's `converged_lab` (shared with the deploy and checks tests, so the suite
pays for one pyinfra deploy); VM B is converged here by Ansible. Figures are printed with -s.
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

import pytest

from gpunode.facts import snapshot_command, snapshot_spec
from gpunode.hostcmd import managed_paths, unit_names
from gpunode.inventory import load_site
from gpunode.model import NodeProfile

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
                   r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)", re.M)
#: Units whose state belongs to the comparison (besides the profile's own).
UNIT_PATTERNS = ("nvidia", "vllm", "gpunode", "irqbalance", "docker", "containerd", "dcgm")
#: Values that differ per VM by nature.
HOST_SPECIFIC = ("MainPID",)


def _cli(*args: str, timeout: float = 1800) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gpunode.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def ansible_playbook(site: Path, node: str, *extra: str) -> tuple[int, str, float]:
    env = {**os.environ, "GPUNODE_SITE": str(site), "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_NOCOLOR": "1"}
    started = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")),
                           "playbooks/gpu_node.yml", "--limit", node, *extra], cwd=REPO,
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


def state_dump(vm: Any, p: NodeProfile) -> dict[str, Any]:
    """What a converged node IS, read in one snapshot command plus systemctl listings."""
    spec = snapshot_spec(p, managed_paths(p), unit_names(p))
    data = json.loads(vm.check("sudo " + snapshot_command(spec), timeout=300))
    listing = vm.check("systemctl list-unit-files --no-legend --no-pager --state=enabled; "
                       "echo ==; systemctl list-units --no-legend --no-pager --plain "
                       "--state=active", timeout=120)
    enabled, active = listing.split("==\n")
    keep = lambda name: any(pat in name for pat in UNIT_PATTERNS)  # noqa: E731
    return {
        "files": data["files"],
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
    }


def diff(a: Any, b: Any, path: str = "") -> list[str]:
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


@pytest.fixture(scope="module")
def lab_facts(lab: Any) -> dict[str, Any]:
    from gpunode.lab import labsite

    try:
        return labsite.prepare_lab(lab.dir)
    except Exception as exc:  # noqa: BLE001 - a lab that cannot start is a failure with its reason
        pytest.fail(f"the lab's simulated mirrors did not start: {exc}", pytrace=False)


def converge(lab: Any, facts: dict[str, Any], name: str, engine: str,
             figures: dict[str, Any]) -> tuple[Any, Path, NodeProfile]:
    from gpunode.lab import labsite

    vm = lab.up(name, cpus=2, memory_mib=3072, numa=2)
    labsite.prepare_guest(vm, models=("/var/lib/vllm/models/tiny-sim",))
    site = labsite.write_lab_site(lab, facts, lab.dir / f"site-{name}.yaml")
    p = load_site(site).nodes[name]
    rc, out, seconds = _cli("deploy", name, "--site", str(site), "--engine", engine)
    figures[f"{engine}_fresh_s"] = round(seconds, 1)
    assert rc == 0, f"gpunode deploy --engine {engine} failed:\n{out[-6000:]}"
    rc, out, seconds = _cli("check", name, "--site", str(site))
    figures[f"{engine}_check_s"] = round(seconds, 1)
    assert rc == 0, f"gpunode check after the {engine} deploy failed:\n{out[-6000:]}"
    return vm, site, p


def test_ansible_converges_like_pyinfra_and_is_idempotent(lab: Any, lab_facts: dict,
                                                          converged_lab: Any) -> None:
    figures: dict[str, Any] = {"pyinfra_fresh_s": round(converged_lab.first_seconds, 1)}
    # pyinfra: the session's converged VM, dumped before any other test touches it.
    rc, out, seconds = _cli("check", converged_lab.name, "--site", str(converged_lab.site))
    figures["pyinfra_check_s"] = round(seconds, 1)
    assert rc == 0, f"gpunode check after the pyinfra deploy failed:\n{out[-6000:]}"
    dump_a = state_dump(converged_lab.vm, converged_lab.profile)
    vm_b, site_b, p_b = converge(lab, lab_facts, "paransible", "ansible", figures)
    dump_b = state_dump(vm_b, p_b)

    rc, out, seconds = ansible_playbook(site_b, "paransible")
    figures["ansible_noop_s"] = round(seconds, 1)
    assert rc == 0, out[-6000:]
    second = recap(out, "paransible")
    assert second["changed"] == 0, f"second run changed: {changed_tasks(out)}"

    rc, out, seconds = ansible_playbook(site_b, "paransible", "--check", "--diff")
    figures["ansible_check_diff_s"] = round(seconds, 1)
    assert rc == 0, out[-6000:]
    check = recap(out, "paransible")
    assert check["changed"] == 0, f"--check --diff reports changes: {changed_tasks(out)}"
    print("\nansible parity figures: " + json.dumps(figures))

    lab.down("paransible")
    differences = diff(dump_a, dump_b)
    assert not differences, ("pyinfra- and Ansible-converged VMs differ:\n"
                             + "\n".join(differences))
