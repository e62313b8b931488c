"""GPU settings (persistence, power limit, ECC, clocks, compute mode) as read-compare-set
state: a oneshot unit after nvidia-persistenced applies them at every boot; the deploy
re-runs it when the files changed or nvidia-smi reports drift."""

from pyinfra.api import deploy

from gpunode.core import paths, plan
from gpunode.core.files import gpu_settings_files
from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile

UNIT = paths.GPU_SETTINGS_UNIT


@deploy("GPU settings")
def deploy_gpu_settings(p: NodeProfile) -> None:
    files = gpu_settings_files(p)
    for f in files:
        ops.managed_file(name=f"Write {f.path}", p=p, f=f)
    ops.daemon_reload(name="Reload systemd units", p=p, unit_paths=[f.path for f in files])
    ops.unit(name="Enable the GPU settings unit", p=p, unit_name=UNIT, running=None)
    # nvidia-uvm first (modules-load.d loads it only at boot): systemd fixes the unit's
    # DeviceAllow=char-nvidia-uvm when the unit starts, so the unit's own nvidia-modprobe
    # could load the module but not create /dev/nvidia-uvm
    ops.run_when(
        name="Apply GPU settings where nvidia-smi differs from the profile", p=p,
        tag="gpu-settings", command=f"modprobe nvidia-uvm && systemctl restart {UNIT}",
        needed=lambda snap: plan.gpu_settings_needed(p, snap) or (
            snap.smi_ok and ops.changed(*(f.path for f in files))))
