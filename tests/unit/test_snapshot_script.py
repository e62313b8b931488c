"""gpunode/facts/snapshot_remote.py (runs on the host): readers tested on SIMULATED files."""

from __future__ import annotations

from pathlib import Path

import pytest

import gpunode.facts

SCRIPT = Path(gpunode.facts.__file__).with_name("snapshot_remote.py")


def script_namespace(files: dict[str, str]) -> dict:
    """The script's functions (without running main) reading `files` instead of the host."""
    source = SCRIPT.read_text()
    assert source.rstrip().endswith("\nmain()")
    ns: dict = {"__name__": "snapshot_remote"}
    exec(compile(source.rstrip()[:-len("main()")], str(SCRIPT), "exec"), ns)  # noqa: S102
    ns["read"] = lambda path, default=None: files.get(path, default)
    return ns


@pytest.mark.parametrize("config, want", [
    ("CONFIG_TRANSPARENT_HUGEPAGE=y\n# CONFIG_TRANSPARENT_HUGEPAGE_ALWAYS is not set\n"
     "CONFIG_TRANSPARENT_HUGEPAGE_MADVISE=y\n", "madvise"),  # Ubuntu
    ("CONFIG_TRANSPARENT_HUGEPAGE=y\nCONFIG_TRANSPARENT_HUGEPAGE_ALWAYS=y\n"
     "# CONFIG_TRANSPARENT_HUGEPAGE_MADVISE is not set\n", "always"),  # Debian
    ("CONFIG_TRANSPARENT_HUGEPAGE=y\nCONFIG_TRANSPARENT_HUGEPAGE_NEVER=y\n", "never"),
    ("# CONFIG_TRANSPARENT_HUGEPAGE is not set\n", None),
    (None, None),  # no config file: unknown
])
def test_thp_default_from_the_running_kernel_config(config, want):
    files = {} if config is None else {"/boot/config-6.8.0-49-generic": config}
    assert script_namespace(files)["thp_default"]("6.8.0-49-generic") == want
