"""`gpunode check` on a lab VM converged by the deploy: it passes, and breaking one thing per
concern makes the matching check fail with a message saying what differs. Each case repairs
what it broke; the last test proves the whole suite passes again.

The VM is the session's `converged_lab` (tests/integration/conftest.py: a lab VM deployed
once by `gpunode deploy`); GPUNODE_CONVERGED_SITE=<site file> (and
GPUNODE_CONVERGED_NODE=<node>, default: the only node) reuses a VM that is already converged.
How long a check takes is printed here (with -s) and measured by bench/, never asserted.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import testinfra

from gpunode.cli.check import ssh_config_text
from gpunode.core import desired
from gpunode.core.files import placements
from gpunode.core.hostcmd import BLOCK_APPLY
from gpunode.core.topology import (
    NVIDIA_SMI_QUERY,
    attach_topology,
    parse_cpulist,
    parse_query_gpu,
    parse_topo,
)
from gpunode.inventory import load_site
from gpunode.model import NodeProfile

pytestmark = [pytest.mark.integration, pytest.mark.slow]

@dataclass
class Converged:
    site: Path
    node: str
    profile: NodeProfile
    host: object  # testinfra Host with sudo

    def run(self, command: str) -> str:
        result = self.host.run(command)  # type: ignore[attr-defined]
        assert result.rc == 0, f"`{command}` failed ({result.rc}): {result.stderr}"
        return result.stdout


def _host(site_path: Path, profile: NodeProfile, tmp: Path) -> object:
    cfg = tmp / "ssh_config"
    cfg.write_text(ssh_config_text([profile], site_path))
    sudo = profile.connection.become and profile.connection.user != "root"
    return testinfra.get_host(f"paramiko://{profile.name}", ssh_config=str(cfg), sudo=sudo)


@pytest.fixture(scope="module")
def converged(request: pytest.FixtureRequest) -> Iterator[Converged]:
    """A converged lab VM: $GPUNODE_CONVERGED_SITE (+ $GPUNODE_CONVERGED_NODE) when set,
    else the session's `converged_lab` (tests/integration/conftest.py)."""
    with tempfile.TemporaryDirectory(prefix="gpunode-chkneg-") as tmpdir:
        env_site = os.environ.get("GPUNODE_CONVERGED_SITE")
        if env_site:
            site_path, node = Path(env_site), os.environ.get("GPUNODE_CONVERGED_NODE", "")
        else:
            lab = request.getfixturevalue("converged_lab")
            site_path, node = Path(lab.site), lab.name
        site = load_site(site_path)
        if not node:
            assert len(site.nodes) == 1, "name the node: GPUNODE_CONVERGED_NODE"
            node = next(iter(site.nodes))
        profile = site.nodes[node]
        yield Converged(site_path, node, profile, _host(site_path, profile, Path(tmpdir)))


def gpunode_check(c: Converged, *args: str) -> tuple[int, dict, float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "gpunode.cli.main", "check", c.node, "--site",
                               str(c.site), "--json", str(out), *args],
                              capture_output=True, text=True, timeout=600)
        elapsed = time.monotonic() - started
        doc = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, doc, elapsed, proc.stdout + proc.stderr


def messages(doc: dict, node: str) -> list[str]:
    return [f"{d['concern']}::{d['check']}: {d['message']}"
            for d in doc.get("hosts", {}).get(node, {}).get("drifted", [])]


def test_converged_node_passes(converged):
    rc, doc, elapsed, output = gpunode_check(converged)
    print(f"\ngpunode check {converged.node}: exit {rc} in {elapsed:.1f} s (pytest part "
          f"{doc.get('hosts', {}).get(converged.node, {}).get('duration_s')} s)")
    assert rc == 0, output
    counts = doc["hosts"][converged.node]["counts"]
    assert counts["passed"] > 30 and counts["failed"] == counts["error"] == 0, counts


# --- one break per concern ------------------------------------------------------------------

@dataclass
class Break:
    """Break the host, the checks (-k) that must fail, the text the failure must contain,
    and the repair."""

    id: str
    keyword: str
    apply: Callable[[Converged], list[str]]  # returns the expected message fragments
    repair: Callable[[Converged], None]


SWAPPINESS = "vm.swappiness"


def _sysctl_break(c: Converged) -> list[str]:
    want = desired.sysctls(c.profile)[SWAPPINESS]
    wrong = str(int(want) + 1)
    c.run(f"sysctl -qw {SWAPPINESS}={wrong}")
    return ["sysctl differ (expected, actual)", f"'{SWAPPINESS}': ('{want}', '{wrong}')"]


def _sysctl_repair(c: Converged) -> None:
    c.run(f"sysctl -qw {SWAPPINESS}={desired.sysctls(c.profile)[SWAPPINESS]}")


def _block_break(c: Converged) -> list[str]:
    dev = "vda"  # the lab VM's system disk (virtio)
    c.run(f"echo none > /sys/block/{dev}/queue/scheduler && "
          f"echo 64 > /sys/block/{dev}/queue/read_ahead_kb")
    scheduler, read_ahead = desired.block_wanted(c.profile, dev)
    return [f"{dev}: I/O scheduler none, expected {scheduler}",
            f"{dev}: read-ahead 64 KiB, expected {read_ahead}"]


def _block_repair(c: Converged) -> None:
    # gpunode's own udev rules put the disk back: this also proves that they apply
    c.run(BLOCK_APPLY)


def _held_driver_package(c: Converged) -> str:
    return desired.driver_packages(c.profile)[0]


def _unhold_break(c: Converged) -> list[str]:
    name = _held_driver_package(c)
    c.run(f"apt-mark unhold {name}")
    return ["driver packages not held", name]


def _unhold_repair(c: Converged) -> None:
    c.run(f"apt-mark hold {_held_driver_package(c)}")


def _service(c: Converged) -> str:
    return c.profile.vllm.services[0].name


def _stop_break(c: Converged) -> list[str]:
    unit = desired.vllm_unit(_service(c))
    c.run(f"systemctl stop {unit}")
    return [unit, "expected enabled/active/running", "inactive"]


def _restart(unit: str) -> str:
    """A deliberate restart: the unit's start limit (5 starts in 15 minutes, there to stop a
    crash loop) is reset first, since these breaks and repairs restart it several times in a
    few minutes on a freshly converged node."""
    return f"systemctl reset-failed {unit}; systemctl restart {unit}"


def _restart_clean(c: Converged) -> None:
    unit = desired.vllm_unit(_service(c))
    c.run(f"rm -f /etc/systemd/system/{unit}.d/zz-chkneg.conf && systemctl daemon-reload && "
          f"{_restart(unit)}")


def _dropin(c: Converged, body: str) -> None:
    unit = desired.vllm_unit(_service(c))
    path = f"/etc/systemd/system/{unit}.d/zz-chkneg.conf"
    c.run(f"printf '%s\\n' {shlex.quote(body)} > {path} && systemctl daemon-reload && "
          f"{_restart(unit)}")


def _expected_cpus(c: Converged) -> list[int]:
    gpus = parse_query_gpu(c.run(NVIDIA_SMI_QUERY))
    attach_topology(gpus, parse_topo(c.run("nvidia-smi topo -m")))
    cpus = list(placements(c.profile, gpus)[_service(c)].cpus)
    return cpus or parse_cpulist(c.run("cat /sys/devices/system/cpu/online"))


def _affinity_break(c: Converged) -> list[str]:
    want = _expected_cpus(c)
    wrong = 0 if want != [0] else 1
    # CPUAffinity= assignments merge; an empty one resets the mask first.
    _dropin(c, f"[Service]\nCPUAffinity=\nCPUAffinity={wrong}")
    return ["CPU affinity differs", "processes have", f"'{wrong}'"]


def _key_on_cmdline_break(c: Converged) -> list[str]:
    svc = c.profile.vllm.services[0]
    if not svc.api_key_file:
        pytest.skip("the first service has no API key")
    # $$ is systemd's escape for a literal $: the shell reads the credential, so the key
    # ends up in vllm's own argv, which the check must notice.
    start = (f"ExecStart=/bin/sh -c 'exec {c.profile.vllm.prefix}/venv/bin/vllm serve --config "
             f"/etc/vllm/{svc.name}.yaml --api-key \"$$(cat \"$${{CREDENTIALS_DIRECTORY}}/api-key\")\"'")
    _dropin(c, f"[Service]\nExecStart=\n{start}")
    return ["API key visible in", "/cmdline"]


BREAKS = [
    Break("sysctl", "test_sysctls", _sysctl_break, _sysctl_repair),
    Break("block-io", "test_block_io", _block_break, _block_repair),
    Break("unhold", "test_driver_packages_held", _unhold_break, _unhold_repair),
    Break("stop-unit", "test_units_enabled_and_active", _stop_break, _restart_clean),
    Break("cpu-affinity", "test_cpu_affinity", _affinity_break, _restart_clean),
    Break("key-on-cmdline", "test_api_key_kept_secret", _key_on_cmdline_break, _restart_clean),
]


@pytest.mark.parametrize("case", BREAKS, ids=[b.id for b in BREAKS])
def test_break_is_detected(converged, case):
    if case.id in ("stop-unit", "cpu-affinity", "key-on-cmdline") and not \
            converged.profile.vllm.services:
        pytest.skip("the node has no vLLM service")
    try:
        fragments = case.apply(converged)
        rc, doc, elapsed, output = gpunode_check(converged, "-k", case.keyword)
        found = messages(doc, converged.node)
        print(f"\n{case.id}: exit {rc} in {elapsed:.1f} s; " + "\n".join(found))
        assert rc == 1, output
        assert any(all(f in m for f in fragments) for m in found), (
            f"no failure mentions {fragments}: {found}")
    finally:
        case.repair(converged)


def test_repaired_node_passes_again(converged):
    """After every break above was repaired (one full run instead of one per case)."""
    rc, doc, _, output = gpunode_check(converged)
    assert rc == 0, f"after the repairs: {messages(doc, converged.node)}\n{output[-2000:]}"
