"""Where the lab keeps its image cache and its state."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/gpunode/lab` (default `~/.cache/gpunode/lab`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpunode" / "lab"


def images_dir() -> Path:
    return cache_root() / "images"


def default_state_dir() -> Path:
    """`$GPUNODE_LAB_DIR`, else `~/.cache/gpunode/lab/state`."""
    env = os.environ.get("GPUNODE_LAB_DIR")
    return Path(env) if env else cache_root() / "state"


def socket_dir(state_dir: Path) -> Path:
    """A short directory for unix sockets (their paths are limited to ~100 bytes).

    Keyed by the state directory, so two labs never share sockets.
    """
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"gpunode-lab-{digest}"
