"""Sandboxing of the units gpunode writes, scored by `systemd-analyze security --offline`
(systemd 252, the version of the Debian 12 lab guests and of this project's development and
CI machines). Lower is tighter; the bounds are the figures reached, so a change that loosens
a unit fails here. That the sandboxed units still do their job is proven in the lab: the
deploy tests prefetch a model, apply GPU settings (also after a reboot) and serve."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gpunode.core import paths
from gpunode.core.render import render
from gpunode.inventory import load_site

REPO = Path(__file__).resolve().parents[2]

#: unit template -> (instance name to analyse, highest exposure allowed)
BOUNDS = {
    "vllm/vllm-prefetch@.service.j2": ("vllm-prefetch@m.service", 1.5),
    "gpu_settings/gpunode-gpu-settings.service.j2": ("gpunode-gpu-settings.service", 1.6),
    "vllm/vllm@.service.j2": ("vllm@m.service", 3.3),
}


def exposure(unit: Path) -> float:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install systemd (Debian package) to run this test"
    proc = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@pytest.mark.parametrize("template", sorted(BOUNDS))
def test_unit_exposure(tmp_path: Path, template: str) -> None:
    p = load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes["labgpu1"]
    name, bound = BOUNDS[template]
    unit = tmp_path / name
    unit.write_text(render(template, p))
    score = exposure(unit)
    print(f"{name}: exposure {score}")
    assert score <= bound, f"{name}: exposure {score} > {bound}"


def test_prefetch_can_write_only_the_model_cache(tmp_path: Path) -> None:
    p = load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes["labgpu1"]
    text = render("vllm/vllm-prefetch@.service.j2", p)
    assert "ProtectSystem=strict\n" in text
    assert f"ReadWritePaths={p.vllm.model_cache} /var/lib/vllm\n" in text


def _directives(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_gpu_settings_unit_creates_the_uvm_nodes_before_vllm_starts() -> None:
    """nvidia.ko makes no /dev/nvidia-uvm and CUDA cannot create it from vLLM's
    NoNewPrivileges= sandbox: the GPU settings unit creates it first, as root (+), with the
    device cgroup letting it mknod (DevicePolicy= binds + commands too), and every vLLM
    unit waits for that unit."""
    from gpunode.core import desired
    from gpunode.core.files import driver_files

    p = load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes["labgpu1"]
    settings = render("gpu_settings/gpunode-gpu-settings.service.j2", p)
    pre = _directives(settings, "ExecStartPre")
    assert pre == ["+/usr/bin/nvidia-modprobe -u -c=0"]
    assert settings.index("ExecStartPre=") < settings.index("ExecStart=/")
    assert "char-nvidia-uvm rwm" in _directives(settings, "DeviceAllow")
    vllm = render("vllm/vllm@.service.j2", p)
    for key in ("After", "Wants"):
        assert "gpunode-gpu-settings.service" in " ".join(_directives(vllm, key)).split()
    modules = {f.path: f for f in driver_files(p)}[paths.MODULES_LOAD]
    assert [ln for ln in modules.content.splitlines() if not ln.startswith("#")] == ["nvidia-uvm"]
    assert "nvidia-modprobe" in desired.driver_packages(p)
