"""Concern `manifest`: record what the deploy left on the node in
/var/lib/gpunode/manifest.json (gpunode.core.manifest), built at execution time from the
snapshot as it is after every other concern, written only when it changed."""

from __future__ import annotations

from gpunode.core.manifest import MANIFEST_PATH, manifest_file
from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile


def deploy_manifest(p: NodeProfile) -> None:
    ops.placement_file(name=f"Write the node manifest {MANIFEST_PATH}", p=p, path=MANIFEST_PATH,
                       build=lambda snap: manifest_file(p, snap.data))
