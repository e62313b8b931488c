"""SIMULATION: lab equipment standing in for NVIDIA hardware, packages and tools.

See CONTRACT.md. `prepare()` builds the simulated apt repositories and the local Python
index (both cached) and returns what the lab site file needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def prepare(
    www_root: Path | str | None = None,
    *,
    port: int | None = None,
    key_dir: Path | str | None = None,
    python_index: bool = True,
) -> dict[str, Any]:
    """Build the simulated NVIDIA apt repositories and the guest Python index (cached).

    www_root: default `$GPUNODE_LAB_WWW` or `~/.cache/gpunode/lab/www`;
    port: the port the lab serves on (default `$GPUNODE_LAB_HTTP_PORT` or 18087) — the
    URLs returned are the guests' view, http://10.0.2.2:<port>/...
    Returns the facts the lab site file needs (see the keys below); repo.json in the www
    root holds the full manifest.
    """
    from gpunode.lab.sim import pyindex, repo

    www = Path(www_root) if www_root else repo.default_www_root()
    base = repo.guest_base_url(port)
    manifest = repo.build(www, base_url=base, key_dir=key_dir)
    debian = manifest["cuda"]["distros"]["debian12"]
    facts: dict[str, Any] = {
        "simulation": True,
        "www_root": str(www),
        "base_url": base,
        "manifest": str(www / repo.MANIFEST),
        "nvidia_repo_url": manifest["cuda"]["repo_url"],
        "keyring_url": debian["keyring_url"],
        "keyring_sha256": debian["keyring_sha256"],
        "keyring_sha256_by_distro": {
            d: info["keyring_sha256"] for d, info in manifest["cuda"]["distros"].items()
        },
        "driver_branch": manifest["driver_branch"],
        "driver_versions": manifest["driver_versions"],
        "driver_deb_versions": debian["driver_deb_versions"],
        "container_toolkit_repo_url": manifest["container_toolkit"]["repo_url"],
        "container_toolkit_list_url": manifest["container_toolkit"]["list_url"],
        "container_toolkit_gpgkey_url": manifest["container_toolkit"]["gpgkey_url"],
        "container_toolkit_versions": manifest["container_toolkit"]["versions"],
        "pypi_index_url": f"{base}/{pyindex.INDEX_DIR}/simple/",
    }
    if python_index:
        index = pyindex.build(www)
        facts["pypi_projects"] = sorted(index["projects"])
        facts["vllm_standin_wheel"] = index["standin_wheel"]
        facts["uv_version"] = index["uv_version"]
    return facts
