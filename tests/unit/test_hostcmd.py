"""The host commands both engines run: dpkg-lock waiting bounded by the profile, stamps
recorded only after success, and the dpkg recovery loop; the shell snippets are run for
real with stand-in commands where their control flow matters."""

from __future__ import annotations

import subprocess

import pytest

from gpunode.core import hostcmd, paths
from gpunode.model import NodeProfile


def profile(**over) -> NodeProfile:
    return NodeProfile.model_validate({"name": "n", "connection": {"address": "h"},
                                       "os": "debian-12", **over})


def test_every_apt_and_apt_mark_command_waits_for_the_lock_as_long_as_the_profile_says():
    p = profile(apt_lock_timeout_s=42)
    assert "-o DPkg::Lock::Timeout=42 " in hostcmd.apt_get(p, "update")
    hold = hostcmd.apt_mark(p, "hold", ["a", "b"])
    assert "until apt-mark hold a b; do" in hold and "[ $n -gt 42 ]" in hold
    move = hostcmd.driver_to_version(p, ["libcuda1", "nvidia-driver-cuda"])
    assert "until apt-mark unhold libcuda1 nvidia-driver-cuda;" in move
    assert "DPkg::Lock::Timeout=42" in move and "--allow-downgrades libcuda1 nvidia-driver-cuda" in move
    keyring = hostcmd.keyring_install(p)
    assert keyring is not None and "sha256sum /tmp/cuda-keyring_1.1-1_all.deb" in keyring
    assert "DPkg::Lock::Timeout=42" in keyring and "dpkg -i" not in keyring


def test_the_keyring_is_checked_against_the_profiles_checksum_when_given():
    sha = "ab" * 32
    p = profile(nvidia={"repo_url": "http://mirror.invalid/cuda/repos", "keyring_sha256": sha})
    command = hostcmd.keyring_install(p)
    assert command is not None
    assert f'[ "$got" = {sha} ]' in command
    assert "http://mirror.invalid/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb" in command


def run_sh(script: str, path_dir) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{path_dir}:/usr/bin:/bin"}, check=False)


def test_stamp_is_written_only_when_the_command_succeeds(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "STAMPS", str(tmp_path / "stamps"))
    ok = run_sh(hostcmd.stamped_command("true", "grub", "key 1"), tmp_path)
    assert ok.returncode == 0
    assert (tmp_path / "stamps" / "grub.stamp").read_text() == "key 1\n"
    failed = run_sh(hostcmd.stamped_command("false", "cdi", "key 2"), tmp_path)
    assert failed.returncode != 0 and not (tmp_path / "stamps" / "cdi.stamp").exists()


def fake(path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def locked_script(tmp_path, command: str, timeout: int) -> str:
    """The retry wrapper around `command`, probing a lock file under tmp_path instead of
    dpkg's, and not sleeping."""
    script = hostcmd.dpkg_lock_retry(profile(apt_lock_timeout_s=timeout), command)
    return (script.replace("/var/lib/dpkg/lock-frontend", str(tmp_path / "lock"))
            .replace("sleep 5", "sleep 0"))


def test_lock_retry_waits_while_the_lock_is_held_and_stops_at_the_bound(tmp_path):
    import fcntl

    calls = tmp_path / "calls"
    fake(tmp_path / "dpkg", f"echo x >> {calls}\n[ $(wc -l < {calls}) -ge 3 ]")
    with open(tmp_path / "lock", "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # held by "another process" (this one)
        # fails twice while the lock is held, then succeeds
        assert run_sh(locked_script(tmp_path, "dpkg", 30), tmp_path).returncode == 0
        assert calls.read_text().count("x") == 3
        calls.unlink()
        fake(tmp_path / "dpkg", f"echo x >> {calls}; exit 2")
        # the lock stays held: gives up after the bound (30 s / 5 s steps = 7 tries)
        assert run_sh(locked_script(tmp_path, "dpkg", 30), tmp_path).returncode == 1
        assert calls.read_text().count("x") == 7


def test_lock_retry_fails_at_once_when_the_lock_is_free(tmp_path):
    calls = tmp_path / "calls"
    fake(tmp_path / "dpkg", f"echo x >> {calls}; exit 2")
    result = run_sh(locked_script(tmp_path, "dpkg", 300) + " && echo chained", tmp_path)
    assert result.returncode == 1 and "chained" not in result.stdout
    assert calls.read_text().count("x") == 1


def test_initramfs_rebuild_only_when_an_image_predates_the_blacklist(tmp_path):
    """The dpkg trigger of the driver packages rebuilt the image after the blacklist was
    written: no second rebuild. An older image, or none at all, means rebuild."""
    import os

    boot, blacklist = tmp_path / "boot", tmp_path / "blacklist-nouveau.conf"
    boot.mkdir()
    blacklist.write_text("blacklist nouveau\n")
    os.utime(blacklist, (1000, 1000))

    def current() -> int:
        return subprocess.run(["sh", "-c", hostcmd.initramfs_current(str(boot), str(blacklist))],
                              check=False).returncode

    assert current() == 1  # no image yet
    for name, mtime in (("initrd.img-6.1.0-56-amd64", 2000), ("initrd.img-6.1.0-55-amd64", 3000)):
        (boot / name).write_bytes(b"x")
        os.utime(boot / name, (mtime, mtime))
    assert current() == 0
    os.utime(boot / "initrd.img-6.1.0-55-amd64", (500, 500))  # one image predates it
    assert current() == 1
    assert hostcmd.STAMP_COMMANDS["initramfs"].startswith(hostcmd.initramfs_current())
    assert hostcmd.STAMP_COMMANDS["initramfs"].endswith("|| update-initramfs -u -k all")


def test_uv_downloads_python_only_without_an_index_override_or_from_the_python_mirror():
    def env(**vllm):
        command = hostcmd.venv_command(profile(vllm=vllm))
        venv = next(c for c in command.split(" && ") if " venv -q " in c)
        return venv
    index = "http://10.0.2.2:18087/pypi/simple/"
    assert "UV_PYTHON_DOWNLOADS=automatic" in env()
    assert "UV_PYTHON_DOWNLOADS=never" in env(index_url=index, python="3.11")
    mirrored = env(index_url=index, python_mirror="http://10.0.2.2:18087/pbs")
    assert "UV_PYTHON_DOWNLOADS=automatic" in mirrored
    assert "UV_PYTHON_INSTALL_MIRROR=http://10.0.2.2:18087/pbs" in mirrored
    # the interpreter uv installs lives below the prefix, readable by the service user
    assert "UV_PYTHON_INSTALL_DIR=/opt/vllm/python" in mirrored


def keyring_run(tmp_path, p: NodeProfile, served: bytes) -> subprocess.CompletedProcess[str]:
    """The keyring command with curl serving `served` and apt-get recording its call."""
    (tmp_path / "served.deb").write_bytes(served)
    fake(tmp_path / "curl", f'while [ "$1" != -o ]; do shift; done; cp {tmp_path}/served.deb "$2"')
    fake(tmp_path / "apt-get", f"echo \"$@\" > {tmp_path}/apt-get.called")
    command = hostcmd.keyring_install(p)
    assert command is not None
    return run_sh(command, tmp_path)


def test_a_keyring_checksum_mismatch_names_the_field_the_os_and_both_checksums(tmp_path):
    import hashlib
    bogus = b"not the keyring"
    got = hashlib.sha256(bogus).hexdigest()
    p = NodeProfile.model_validate({"name": "n", "connection": {"address": "h"},
                                    "os": "ubuntu-22.04"})
    published = hostcmd.desired.UPSTREAM_KEYRING_SHA256["ubuntu2204"]
    r = keyring_run(tmp_path, p, bogus)
    assert r.returncode != 0 and not (tmp_path / "apt-get.called").exists()
    assert r.stderr == (
        "nvidia.keyring_sha256 (ubuntu-22.04): https://developer.download.nvidia.com/compute/"
        f"cuda/repos/ubuntu2204/x86_64/cuda-keyring_1.1-1_all.deb has sha256 {got}, expected "
        f"{published} (the checksum NVIDIA publishes for ubuntu2204); a mirror serving another "
        "keyring needs its own nvidia.keyring_sha256\n")
    # the site's own value, matching what the mirror serves: installed
    mirror = profile(nvidia={"repo_url": "http://mirror.invalid/cuda/repos",
                             "keyring_sha256": got})
    ok = keyring_run(tmp_path, mirror, bogus)
    assert ok.returncode == 0, ok.stderr
    assert "install --reinstall /tmp/cuda-keyring_1.1-1_all.deb" in (
        tmp_path / "apt-get.called").read_text()


@pytest.mark.parametrize(("host", "url"), [("0.0.0.0", "http://127.0.0.1:8123/health"),
                                           ("::", "http://127.0.0.1:8123/health"),
                                           ("10.1.2.3", "http://10.1.2.3:8123/health"),
                                           ("fd00::7", "http://[fd00::7]:8123/health")])
def test_the_readiness_gate_probes_the_address_in_the_services_own_config(tmp_path, host, url):
    """Host and port come from the YAML vLLM serves from (was: VLLM_HTTP_HOST/PORT in the
    unit's environment, variables vLLM does not know and warns about)."""
    from gpunode.core.files import node_files
    from gpunode.core.filters import to_yaml_block

    p = profile(gpus={"count": 1}, vllm={"services": [
        {"name": "a", "model": "/m", "gpus": [0], "port": 8123, "host": host}]})
    gate = next(f for f in node_files(p) if f.path.endswith("/vllm-wait-ready"))
    (tmp_path / "gate").write_text(gate.content)
    config = tmp_path / "a.yaml"
    config.write_text(to_yaml_block({"host": host, "model": "/m", "port": 8123}) + "\n")
    fake(tmp_path / "curl", f'echo "$@" >> {tmp_path}/curl.called')
    r = run_sh(f"sh {tmp_path}/gate '' {config}", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "curl.called").read_text().split()[-1] == url


REPO_LINE = "https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64  Packages"
#: `apt-cache madison libnccl2` with the same build from two sources (a mirror too).
MADISON = "".join(f"  libnccl2 | {v} | {src}\n" for v, src in (
    ("2.28.9-1+cuda13.0", REPO_LINE), ("2.28.9-1+cuda12.9", REPO_LINE),
    ("2.27.7-1+cuda13.0", REPO_LINE),
    ("2.28.9-1+cuda13.0", "http://mirror.invalid/cuda/repos/debian12/x86_64  Packages")))


def nccl_run(tmp_path, p: NodeProfile, madison: str) -> subprocess.CompletedProcess[str]:
    """The NCCL check with apt-cache answering `madison libnccl2` with `madison`."""
    (tmp_path / "madison.txt").write_text(madison)
    fake(tmp_path / "apt-cache", f'[ "$1 $2" = "madison libnccl2" ] && cat {tmp_path}/madison.txt')
    command = hostcmd.nccl_available(p)
    assert command is not None
    return run_sh(command, tmp_path)


def test_a_pinned_nccl_build_the_hosts_repositories_lack_stops_with_what_they_offer(tmp_path):
    p = profile(name="gpu07", nccl={"enabled": True, "version": "2.28.7"})
    r = nccl_run(tmp_path, p, MADISON)
    assert r.returncode != 0
    assert r.stderr == (
        "gpu07: nccl.version 2.28.7 with cuda.version 13.0: libnccl2=2.28.7-1+cuda13.0 is not "
        "in this host's apt repositories; they offer for CUDA 13.0: 2.27.7-1+cuda13.0, "
        "2.28.9-1+cuda13.0 (all libnccl2 builds: 2.27.7-1+cuda13.0, 2.28.9-1+cuda12.9, "
        "2.28.9-1+cuda13.0)\n")
    # nothing offered at all (no NVIDIA repository, or lists not refreshed)
    r = nccl_run(tmp_path, p, "")
    assert r.returncode != 0 and r.stderr.endswith(
        "they offer for CUDA 13.0: none (all libnccl2 builds: none)\n")
    # the pinned build is there: silent success
    ok = nccl_run(tmp_path, profile(nccl={"enabled": True, "version": "2.28.9"}), MADISON)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    # a build of another CUDA with the same prefix does not count
    cuda12 = profile(cuda={"version": "12.9"}, nccl={"enabled": True, "version": "2.27.7"})
    r = nccl_run(tmp_path, cuda12, MADISON)
    assert r.returncode != 0 and "they offer for CUDA 12.9: 2.28.9-1+cuda12.9 (" in r.stderr
    assert hostcmd.nccl_available(profile()) is None  # NCCL off: nothing to check
