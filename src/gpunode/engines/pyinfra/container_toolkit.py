"""NVIDIA Container Toolkit: its repository and keyring, a pinned and held package set,
runtimes configured by nvidia-ctk (which merges into existing configs), and the CDI spec,
made again when the driver version or the GPUs change: by the toolkit's own refresh units
from 1.18 on, by nvidia-ctk cdi generate before."""


from pyinfra.api import deploy

from gpunode.core import desired, paths, plan
from gpunode.core.files import container_toolkit_files
from gpunode.core.hostcmd import ctk_key_install, etc_cdi_cleanup, runtime_configure
from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile


@deploy("NVIDIA Container Toolkit")
def deploy_container_toolkit(p: NodeProfile) -> None:
    if not p.container_toolkit.enabled:
        return
    ops.run_when(
        name="Install the container toolkit repository key", p=p, tag="ctk-key",
        needed=plan.ctk_key_needed,
        command=ctk_key_install(p))
    files = container_toolkit_files(p)
    for f in files:
        ops.managed_file(name=f"Write {f.path}", p=p, f=f)
    ops.apt_update(name="Refresh apt lists after repository changes", p=p,
                   when_changed=(*(f.path for f in files), "ctk-key"))
    pkgs = desired.container_toolkit_packages(p)
    ops.apt_install(name="Install the container toolkit (pinned)", p=p, packages=pkgs)
    if p.nvidia.hold:
        ops.apt_hold(name="Hold the container toolkit", p=p, names=[x.name for x in pkgs])
    for runtime in p.container_toolkit.runtimes:
        if runtime == "podman":
            continue  # podman uses the CDI spec; nothing to configure
        ops.run_when(
            name=f"Configure the {runtime} runtime for NVIDIA", p=p, tag=f"runtime:{runtime}",
            needed=lambda snap, r=runtime: plan.runtime_lacks_nvidia(snap, r),
            command=runtime_configure(runtime))
    if desired.cdi_refresh(p):
        # toolkit 1.18: its nvidia-cdi-refresh units keep /var/run/cdi/nvidia.yaml
        ops.run_when(name=f"Remove the CDI spec gpunode generated ({paths.ETC_CDI_SPEC})",
                     p=p, tag="cdi-cleanup",
                     needed=lambda snap: plan.etc_cdi_cleanup_needed(p, snap),
                     command=etc_cdi_cleanup())
        ops.unit(name="Watch for driver and toolkit changes (CDI refresh)", p=p,
                 unit_name=desired.CDI_REFRESH_PATH)
        ops.unit(name="Refresh the CDI spec at boot", p=p,
                 unit_name=desired.CDI_REFRESH_SERVICE, running=None)
        ops.stamped(name="Refresh the CDI spec for this driver", p=p, stamp_name="cdi-refresh",
                    key=plan.cdi_key, force=lambda snap: plan.cdi_spec_missing(p, snap))
    elif p.container_toolkit.cdi:
        ops.stamped(name="Generate the CDI spec for this driver", p=p, stamp_name="cdi",
                    key=plan.cdi_key)
