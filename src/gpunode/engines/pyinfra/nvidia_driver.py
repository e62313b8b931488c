"""NVIDIA driver: kernel headers, the source (CUDA repository with a checksum-verified
keyring, or Ubuntu's archive), branch pinning and exact version, holds, open kernel
modules, nouveau blacklisted in the initramfs, Secure Boot, nvidia-persistenced with
persistence mode really on."""


from pyinfra import host
from pyinfra.api import deploy

from gpunode.core import desired, paths, plan
from gpunode.core.files import driver_files
from gpunode.core.hostcmd import keyring_install
from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile


@deploy("NVIDIA driver")
def deploy_nvidia_driver(p: NodeProfile) -> None:
    snap = ops.snapshot(p)
    dkms = p.nvidia.source == "cuda-repo"
    secure_boot = plan.secure_boot(p, snap)
    if secure_boot == "stop":
        ops.fail(name="Stop: Secure Boot with DKMS modules", message=desired.secure_boot_stop(p))
        return
    if secure_boot == "notice":
        host.noop(desired.secure_boot_notice(p))

    headers = plan.header_packages(p, snap)
    ops.apt_install(name="Install kernel headers for the running and newest kernel", p=p,
                    packages=[desired.Pkg(n) for n in headers])

    files = driver_files(p)
    if dkms:
        install = keyring_install(p)
        if install is None:
            ops.fail(name="Stop: no keyring checksum", message=desired.no_keyring_checksum(p))
            return
        ops.run_when(
            name="Install cuda-keyring (checksum-verified)", p=p, tag="keyring",
            needed=plan.cuda_keyring_needed(snap),
            command=install)
    for f in files:
        ops.managed_file(name=f"Write {f.path}", p=p, f=f)
    sources = tuple(f.path for f in files if f.apt_source)
    ops.apt_update(name="Refresh apt lists after repository changes", p=p,
                   when_changed=(*sources, "keyring"))
    pin = desired.pinning_package(p)
    if pin:
        # NVIDIA: install the pinning package in its own transaction, before the driver.
        ops.apt_install(name=f"Pin the driver branch ({pin})", p=p, packages=[desired.Pkg(pin)])
    # debian-12: newer DKMS packages need a newer dkms than bookworm's (plan.dkms_refusal)
    ops.refuse(name="Check apt offers the dkms the driver's DKMS package needs", p=p,
               check=plan.dkms_refusal)
    ops.driver_to_version(name="Move the driver to the pinned version", p=p)
    ops.apt_install(name="Install the NVIDIA driver", p=p,
                    packages=[desired.Pkg(n) for n in desired.driver_packages(p)])
    if p.nvidia.hold:
        ops.hold_driver(name="Hold the driver packages", p=p)
    blacklist = next(f for f in files if f.path == paths.NOUVEAU_BLACKLIST)
    ops.stamped(name="Rebuild the initramfs without nouveau", p=p, stamp_name="initramfs",
                key=ops.sha256(blacklist.content))
    ops.daemon_reload(name="Reload systemd units", p=p, unit_paths=[f.path for f in files])
    ops.unit(name="Run nvidia-persistenced with persistence mode", p=p,
             unit_name=paths.PERSISTENCED_UNIT, wanted_by="multi-user.target",
             running=lambda snap: snap.smi_ok,
             restart_when=tuple(f.path for f in files if paths.PERSISTENCED_UNIT in f.restart))
