"""Base: supported OS, apt hygiene, packages the rest needs, NVIDIA packages kept out of
unattended-upgrades."""

import time

from pyinfra.api import deploy

from gpunode.core import desired, plan
from gpunode.core.files import base_files
from gpunode.core.hostcmd import apt_get, dpkg_configure_pending
from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile


@deploy("Base")
def deploy_base(p: NodeProfile) -> bool:
    """Queue the base operations; False (and a failing operation) when the host is refused
    (not the profile's OS, or kernel arguments it cannot take), so that nothing else is
    queued for it."""
    refusal = plan.host_refusal(p, ops.snapshot(p).data)
    if refusal:
        ops.fail(name="Refuse this host", message=refusal)
        return False
    ops.run_when(name="Finish an interrupted dpkg run", p=p, tag="dpkg-configure",
                 needed=plan.dpkg_unfinished,
                 command=dpkg_configure_pending(p))
    for f in base_files(p):
        ops.managed_file(name=f"Write {f.path}", p=p, f=f)
    ops.run_when(name="Refresh apt lists older than an hour before installing", p=p,
                 tag="apt-update", command=apt_get(p, "update"),
                 needed=lambda snap: plan.apt_refresh_needed(p, snap, time.time()))
    ops.apt_install(name="Install base packages", p=p,
                    packages=[desired.Pkg(n) for n in desired.base_packages(p)])
    return True
