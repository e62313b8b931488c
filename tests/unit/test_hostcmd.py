"""The host commands both engines run: dpkg-lock waiting bounded by the profile, stamps
recorded only after success, and the dpkg recovery loop; the shell snippets are run for
real with stand-in commands where their control flow matters."""

from __future__ import annotations

import subprocess

from gpunode import hostcmd
from gpunode.model import NodeProfile


def profile(**over) -> NodeProfile:
    return NodeProfile.model_validate({"name": "n", "connection": {"address": "h"},
                                       "os": "debian-12", **over})


def test_every_apt_and_apt_mark_command_waits_for_the_lock_as_long_as_the_profile_says():
    p = profile(apt_lock_timeout_s=42)
    assert "-o DPkg::Lock::Timeout=42 " in hostcmd.apt_get(p, "update")
    assert hostcmd.apt_mark(p, "hold", ["a", "b"]) == (
        "apt-mark -o DPkg::Lock::Timeout=42 hold a b")
    move = hostcmd.driver_to_version(p, ["libcuda1", "nvidia-driver-cuda"])
    assert move.count("DPkg::Lock::Timeout=42") == 2
    assert "--allow-downgrades libcuda1 nvidia-driver-cuda" in move
    keyring = hostcmd.keyring_install(p)
    assert keyring is not None and "sha256sum -c" in keyring
    assert "DPkg::Lock::Timeout=42" in keyring and "dpkg -i" not in keyring


def test_the_keyring_is_checked_against_the_profiles_checksum_when_given():
    sha = "ab" * 32
    p = profile(nvidia={"repo_url": "http://mirror.invalid/cuda/repos", "keyring_sha256": sha})
    command = hostcmd.keyring_install(p)
    assert command is not None
    assert f"echo {sha}' '/tmp/cuda-keyring_1.1-1_all.deb | sha256sum -c" in command
    assert "http://mirror.invalid/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb" in command


def run_sh(script: str, path_dir) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{path_dir}:/usr/bin:/bin"}, check=False)


def test_stamp_is_written_only_when_the_command_succeeds(tmp_path, monkeypatch):
    monkeypatch.setattr(hostcmd, "STAMPS", str(tmp_path / "stamps"))
    ok = run_sh(hostcmd.stamped_command("true", "grub", "key 1"), tmp_path)
    assert ok.returncode == 0
    assert (tmp_path / "stamps" / "grub.stamp").read_text() == "key 1\n"
    failed = run_sh(hostcmd.stamped_command("false", "cdi", "key 2"), tmp_path)
    assert failed.returncode != 0 and not (tmp_path / "stamps" / "cdi.stamp").exists()


def test_dpkg_recovery_retries_while_dpkg_fails_and_gives_up_after_the_bound(tmp_path):
    """A fake dpkg that fails twice (lock held), then succeeds; and one that always fails."""
    counter = tmp_path / "calls"
    fake = tmp_path / "dpkg"
    fake.write_text(f"#!/bin/sh\necho x >> {counter}\n"
                    f"[ $(wc -l < {counter}) -ge 3 ]\n")
    fake.chmod(0o755)
    script = hostcmd.dpkg_configure_pending(profile(apt_lock_timeout_s=30)).replace(
        "sleep 5", "sleep 0")
    assert run_sh(script, tmp_path).returncode == 0
    assert counter.read_text().count("x") == 3
    fake.write_text("#!/bin/sh\nexit 2\n")
    script = hostcmd.dpkg_configure_pending(profile(apt_lock_timeout_s=10)).replace(
        "sleep 5", "sleep 0")
    assert run_sh(script, tmp_path).returncode == 1
