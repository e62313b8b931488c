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


def test_kernel_modules_finds_dkms_and_prebuilt_modules_and_headers(tmp_path):
    """DKMS builds (updates/dkms, compressed too) and Ubuntu's prebuilt linux-modules-nvidia-*
    (kernel/nvidia-<branch>srv) count; a module of another name or modules.dep naming a file
    that is gone (modinfo -n prints it anyway) does not."""
    layout = {
        "6.1.0-30-amd64": ["build/", "updates/dkms/nvidia.ko"],
        "6.1.0-31-amd64": ["build/", "updates/dkms/nvidia.ko.xz"],
        "6.8.0-90-generic": ["kernel/nvidia-580srv/nvidia.ko.zst"],
        "6.8.0-91-generic": ["build/", "updates/dkms/nvidia-uvm.ko"],
        "6.8.0-92-generic": ["kernel/fs/"],
    }
    for k, entries in layout.items():
        for entry in entries:
            path = tmp_path / k / entry
            if entry.endswith("/"):
                path.mkdir(parents=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("x")
    ns = script_namespace({})
    gone = f"{tmp_path}/6.8.0-92-generic/updates/dkms/nvidia.ko\n"
    ns["run"] = lambda cmd, timeout=60: (0, gone, "")
    got = ns["kernel_modules"](sorted(layout), root=str(tmp_path))
    assert {k: (m["headers"], m["nvidia"] and m["nvidia"].removeprefix(f"{tmp_path}/"))
            for k, m in got.items()} == {
        "6.1.0-30-amd64": (True, "6.1.0-30-amd64/updates/dkms/nvidia.ko"),
        "6.1.0-31-amd64": (True, "6.1.0-31-amd64/updates/dkms/nvidia.ko.xz"),
        "6.8.0-90-generic": (False, "6.8.0-90-generic/kernel/nvidia-580srv/nvidia.ko.zst"),
        "6.8.0-91-generic": (True, None),
        "6.8.0-92-generic": (False, None),
    }
    elsewhere = tmp_path / "6.8.0-92-generic/kernel/drivers/video/nvidia.ko"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("x")
    ns["run"] = lambda cmd, timeout=60: (0, f"{elsewhere}\n", "") if cmd[:3] == [
        "modinfo", "-k", "6.8.0-92-generic"] else (1, "", "modinfo: ERROR: not found")
    assert ns["kernel_modules"](["6.8.0-92-generic"], root=str(tmp_path)) == {
        "6.8.0-92-generic": {"headers": False, "nvidia": str(elsewhere)}}
