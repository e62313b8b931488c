"""Host tuning: sysctl file, THP at runtime and at boot (tmpfiles), the CPU governor from a
oneshot unit late in boot (re-run on drift), kernel arguments as idempotent GRUB tokens,
huge pages, limits, and irqbalance kept off the CPUs pinned to vLLM services. What the
platform lacks (cpufreq in VMs) is skipped visibly."""

from pyinfra import host
from pyinfra.api import deploy

from gpunode.core import paths, plan
from gpunode.core.files import ManagedFile, banned_cpus, irq_dropin, tuning_files
from gpunode.core.hostcmd import BLOCK_APPLY, SYSCTL_APPLY, TMPFILES_APPLY
from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile


@deploy("Tuning")
def deploy_tuning(p: NodeProfile) -> None:
    snap = ops.snapshot(p)
    files = tuning_files(p, thp_default=snap.thp_default)
    for f in files:
        ops.managed_file(name=f"Write {f.path}", p=p, f=f)
    ops.run_when(name="Apply sysctls", p=p, tag="sysctl",
                 command=SYSCTL_APPLY,
                 needed=lambda s: plan.sysctl_differs(p, s.data))
    ops.run_when(name="Apply THP now", p=p, tag="tmpfiles",
                 command=TMPFILES_APPLY,
                 needed=lambda s: plan.thp_differs(p, s.data))
    ops.run_when(name="Apply the disks' I/O scheduler and read-ahead", p=p, tag="block-io",
                 command=BLOCK_APPLY, needed=lambda s: bool(plan.block_differs(p, s.data)))
    if p.tuning.governor:
        unit = paths.CPU_GOVERNOR_UNIT
        ops.daemon_reload(name="Reload systemd units (CPU governor unit)", p=p,
                          unit_paths=[paths.CPU_GOVERNOR_UNIT_PATH])
        ops.unit(name="Enable the CPU governor unit", p=p, unit_name=unit, running=None)
        ops.run_when(
            name="Set the CPU governor where it differs from the profile", p=p,
            tag="cpu-governor", command=f"systemctl restart {unit}",
            needed=lambda s: (plan.governor_needed(p, s)
                              or ops.changed(paths.CPU_GOVERNOR_UNIT_PATH)))
    skipped = plan.governor_skipped(p, snap.data)
    if skipped:
        host.noop(skipped)
    grub = next(f for f in files if f.path == paths.GRUB_CFG)
    ops.stamped(name="Update the GRUB configuration", p=p, stamp_name="grub",
                key=lambda snap: plan.grub_key(snap.data, ops.sha256(grub.content)))


@deploy("IRQ placement")
def deploy_irq_placement(p: NodeProfile) -> None:
    """irqbalance keeps device interrupts off the CPUs pinned to vLLM services."""
    if p.tuning.irqbalance == "disabled":
        ops.unit(name="Stop irqbalance", p=p, unit_name=paths.IRQBALANCE_UNIT, enabled=False,
                 running=False)
        return
    if p.tuning.irqbalance != "ban-service-cpus" or not p.vllm.services:
        return
    ops.placement_file(name=f"Write {paths.IRQ_DROPIN}", p=p, path=paths.IRQ_DROPIN,
                       build=lambda snap: _irq_dropin(p, snap))
    ops.daemon_reload(name="Reload systemd units", p=p, unit_paths=[paths.IRQ_DROPIN])
    ops.unit(name="Run irqbalance", p=p, unit_name=paths.IRQBALANCE_UNIT,
             restart_when=(paths.IRQ_DROPIN,))


def _irq_dropin(p: NodeProfile, snap) -> ManagedFile | None:
    if not snap.gpus:
        return None
    cpus = banned_cpus(p, snap.gpus)
    if not cpus:
        return None
    return irq_dropin(p, cpus)
