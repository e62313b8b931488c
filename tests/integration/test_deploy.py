"""The pyinfra deploy on a real lab VM with the simulated NVIDIA stack: a fresh VM converges
in one run (nouveau reboot included), a second run changes nothing, services are healthy and
pinned, faults are reported per host, a driver bump upgrades through holds and a reboot
(after which the GPU settings are back and the whole checks suite passes), and a service
removed from the site is stopped and removed.

The driver bump runs last: it leaves the VM on the newer driver."""

from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path

import pytest
import yaml
from convergence import drift, gpunode_cli, lock, manifest, pyinfra

from gpunode.core import desired
from gpunode.core.files import placements
from gpunode.core.lock import compare_versions
from gpunode.core.manifest import managed_package
from gpunode.core.topology import NVIDIA_SMI_QUERY, attach_topology, parse_query_gpu, parse_topo
from gpunode.lab.sim import repo
from gpunode.model.parts import OS_PYTHON

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def write(site: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(site, sort_keys=False))
    return path


def _version(v: str) -> object:
    return functools.cmp_to_key(compare_versions)(v)


def deploy(site: Path, hosts: list[str]):
    rc, results, seconds = pyinfra(site, hosts)
    return rc, results, seconds


@pytest.fixture(scope="module")
def fresh(converged_lab):
    """The first deploy of a fresh VM (done by the shared fixture) and its outcome."""
    return converged_lab


def test_fresh_vm_converges_in_one_run_with_the_nouveau_reboot(fresh):
    assert fresh.first_rc == 0, fresh.first_results
    assert fresh.boot_ids[0] != fresh.boot_ids[1], "the deploy did not reboot the VM"
    vm = fresh.vm
    assert "nouveau" not in vm.check("cat /proc/modules")
    assert "Open Kernel Module" in vm.check("cat /proc/driver/nvidia/version")


def test_second_run_changes_nothing(fresh):
    rc, results, seconds = deploy(fresh.site, [fresh.name])
    assert rc == 0
    assert results[fresh.name].changed == [], f"changed on a converged host: {results}"
    print(f"no-op deploy: {seconds:.1f} s")


def test_services_are_healthy_and_pinned(fresh):
    vm, profile = fresh.vm, fresh.profile
    gpus = parse_query_gpu(vm.check(NVIDIA_SMI_QUERY))
    attach_topology(gpus, parse_topo(vm.check("nvidia-smi topo -m")))
    where = placements(profile, gpus)
    for svc in profile.vllm.services:
        unit = desired.vllm_unit(svc.name)
        assert vm.check(f"systemctl is-active {unit}").strip() == "active"
        assert vm.check(f"curl -fsS -o /dev/null -w '%{{http_code}}' "
                        f"http://127.0.0.1:{svc.port}/health").strip() == "200"
        pid = vm.check(f"systemctl show -p MainPID --value {unit}").strip()
        status = vm.check(f"sudo cat /proc/{pid}/status")
        allowed = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                       if line.startswith("Cpus_allowed_list"))
        assert allowed == where[svc.name].cpu_list
        key = Path(svc.api_key_file).read_text().strip()
        assert key not in vm.check(f"sudo cat /proc/{pid}/cmdline")


def test_the_converged_pair_runs_the_os_most_users_run(fresh):
    if fresh.os_fallback:
        pytest.skip(f"the converged pair runs {fresh.os}: {fresh.os_fallback}")
    assert fresh.os == "ubuntu-24.04" and fresh.profile.os == fresh.os
    assert "Ubuntu 24.04" in fresh.vm.check("cat /etc/os-release")


#: For each lab OS, another that a wrong profile may claim, and how the host names itself.
CLAIMS = {"ubuntu-24.04": ("debian-12", "ubuntu 24.04"),
          "debian-12": ("ubuntu-24.04", "debian 12")}


def test_unsupported_os_is_refused_before_any_change(fresh, tmp_path):
    """The profile names one OS, the host runs another: the host fails with a message
    naming both, and no file under the paths the deploy manages changed."""
    claimed, found = CLAIMS[fresh.os]
    site = copy.deepcopy(fresh.site_doc)
    site["nodes"][fresh.name]["os"] = claimed
    site["nodes"][fresh.name]["vllm"] = {"python": OS_PYTHON[claimed]}  # valid for the claim
    vm = fresh.vm
    vm.check("touch /tmp/gpunode-before-refusal && sleep 1")
    rc, results, _ = deploy(write(site, tmp_path / "site.yaml"), [fresh.name])
    assert rc == 1
    errors = "\n".join(results[fresh.name].errors)
    assert claimed in errors and found in errors, results
    changed = vm.check("sudo find /etc /opt /usr /var/lib/dpkg /var/lib/gpunode "
                       "-newer /tmp/gpunode-before-refusal -print 2>/dev/null || true")
    assert changed.strip() == "", f"changed by a refused deploy:\n{changed}"


def test_unreachable_host_fails_alone(fresh, tmp_path):
    site = copy.deepcopy(fresh.site_doc)
    site["nodes"]["ghost"] = {"groups": ["lab"],
                             "connection": {"address": "127.0.0.1", "port": 1,
                                            "user": "gpunode"}}
    rc, results, _ = deploy(write(site, tmp_path / "site.yaml"), [fresh.name, "ghost"])
    assert rc != 0
    assert results[fresh.name].errors == []
    assert results[fresh.name].changed == []
    assert results["ghost"].errors and "connecting: Could not connect" in \
        results["ghost"].errors[0], results["ghost"]


def test_pins_and_holds_keep_the_driver_from_upgrading(fresh):
    """Two driver versions are in the (simulated) NVIDIA repository; the node stays on its
    pinned one: apt's candidate is the pin, and an upgrade leaves the held packages alone."""
    vm, p = fresh.vm, fresh.profile
    driver = desired.driver_packages(p)[0]
    policy = vm.check(f"apt-cache policy {driver}")
    assert f"Candidate: {desired.driver_deb_version(p)}" in policy, policy
    assert all(f" {v}-" in policy for v in fresh.facts["driver_versions"]), policy
    plan = vm.check("sudo apt-get -s -o Debug::NoLocking=1 dist-upgrade")
    assert not [line for line in plan.splitlines()
                if line.startswith("Inst ") and "nvidia" in line], plan
    assert driver in vm.check("apt-mark showhold").split()


def test_stand_in_rejects_a_removed_vllm_flag(fresh):
    rc, out, err = fresh.vm.run("/opt/vllm/venv/bin/vllm serve /var/lib/vllm/models/tiny-sim "
                                "--swap-space 4")
    assert rc != 0 and "--swap-space" in out + err


def test_stand_in_started_by_hand_enforces_its_api_key(fresh):
    """The vLLM stand-in as a person would start it: key in VLLM_API_KEY (read from a file,
    never on the command line), /health open, /v1/* answering 401 without the key. vllm@tiny
    holds 92% of each GPU's memory, so this second instance asks for 5% (the stand-in, like
    vLLM, refuses to start when less memory is free than it asks for)."""
    vm = fresh.vm
    vm.run("umask 077 && cat > /tmp/byhand.key", input="by-hand-throwaway-key\n")
    vm.check("cd /tmp; VLLM_API_KEY=$(cat /tmp/byhand.key) setsid nohup "
             "/opt/vllm/venv/bin/vllm serve /var/lib/vllm/models/tiny-sim --host 127.0.0.1 "
             "--port 8100 --served-model-name by-hand --gpu-memory-utilization 0.05 "
             "> /tmp/byhand.log 2>&1 < /dev/null &")
    try:
        code = vm.check("for i in $(seq 240); do c=$(curl -s -o /dev/null -w '%{http_code}' "
                        "http://127.0.0.1:8100/health) && [ \"$c\" = 200 ] && break; sleep 0.5; "
                        "done; echo $c").strip()
        assert code == "200", vm.run("cat /tmp/byhand.log")[1]
        status = "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8100/v1/models"
        assert vm.check(status).strip() == "401"
        _, out, _ = vm.run(status.replace("curl -s", "curl -s -H @-"),
                            input="Authorization: Bearer by-hand-throwaway-key\n")
        assert out.strip() == "200"
        assert "by-hand-throwaway-key" not in vm.check("ps -eo args")
    finally:
        vm.run("rm -f /tmp/byhand.key; pkill -f '[-]-port 8100'")  # the pattern skips this shell


CTK = "nvidia-container-toolkit"
LOCK_HELD = "/run/gpunode-test-lock-held"


def remove_toolkit(vm) -> None:
    """Give the deploy apt work to do: the container toolkit is missing again."""
    vm.check(f"sudo apt-mark unhold {CTK} && sudo DEBIAN_FRONTEND=noninteractive "
             f"apt-get remove -y -q {CTK}")


def hold_dpkg_lock(vm, seconds: int) -> None:
    """Another process holds dpkg's frontend lock (as unattended-upgrades would), with the
    same fcntl lock apt takes; returns once it is held."""
    vm.check(f"sudo rm -f {LOCK_HELD} && sudo systemd-run --unit=gpunode-test-lock --collect "
             "python3 -c \"import fcntl, pathlib, time; f = open('/var/lib/dpkg/lock-frontend', "
             f"'w'); fcntl.lockf(f, fcntl.LOCK_EX); pathlib.Path('{LOCK_HELD}').touch(); "
             f"time.sleep({seconds})\" && for i in $(seq 100); do test -e {LOCK_HELD} && "
             "exit 0; sleep 0.2; done; exit 1")


def test_a_dpkg_lock_held_too_long_fails_clearly_and_a_shorter_hold_is_waited_for(fresh,
                                                                                  tmp_path):
    """dpkg's lock held by another process (as unattended-upgrades would): past the site's
    apt_lock_timeout_s the host fails with apt's own words; held for less, the deploy waits
    and finishes the job (the missing container toolkit)."""
    site = copy.deepcopy(fresh.site_doc)
    site["defaults"]["apt_lock_timeout_s"] = 5
    vm = fresh.vm
    remove_toolkit(vm)
    hold_dpkg_lock(vm, 120)
    try:
        rc, results, _ = deploy(write(site, tmp_path / "site.yaml"), [fresh.name])
    finally:
        vm.check("sudo systemctl stop gpunode-test-lock || true")
    assert rc == 1
    errors = " ".join(results[fresh.name].errors)
    assert "/var/lib/dpkg/lock-frontend" in errors, errors  # apt's own words, with the path

    hold_dpkg_lock(vm, 25)
    rc, results, seconds = deploy(fresh.site, [fresh.name])
    assert rc == 0, results[fresh.name].errors
    assert vm.run("systemctl is-active gpunode-test-lock")[1].strip() != "active"
    assert any("container toolkit" in op for op in results[fresh.name].changed), results
    assert vm.check(f"dpkg-query -W -f '${{Status}}' {CTK}").endswith(" ok installed")
    print(f"deploy waited for the lock: {seconds:.0f} s")


def test_an_interrupted_deploy_converges_on_the_next_run(fresh):
    """Two interruptions: dpkg stopped between unpacking and configuring a package (what a
    crash mid-install leaves), and the deploy itself killed while it works on the host.
    The next run finishes the job; the one after it changes nothing."""
    import signal
    import subprocess
    import time

    from gpunode.cli.deploy import pyinfra_command

    vm = fresh.vm
    remove_toolkit(vm)
    version = next(x.version for x in desired.container_toolkit_packages(fresh.profile)
                   if x.name == CTK)
    vm.check(f"cd /tmp && apt-get download -q {CTK}={version} && "
             f"sudo dpkg --unpack /tmp/{CTK}_{version}_*.deb && rm -f /tmp/{CTK}_*.deb")
    assert vm.check(f"dpkg-query -W -f '${{Status}}' {CTK}") == "install ok unpacked"
    vm.check("sudo systemctl stop vllm@tiny.service")  # the deploy must start it again
    cmd, env = pyinfra_command(fresh.site, [fresh.name])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    killed_at = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Starting operation: NVIDIA driver" in line:  # past base, mid-deploy
            killed_at = line.strip()
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert killed_at, "the deploy finished before it could be interrupted"
    time.sleep(2)
    rc, results, _ = deploy(fresh.site, [fresh.name])
    assert rc == 0, results[fresh.name].errors
    assert vm.check(f"dpkg-query -W -f '${{Status}}' {CTK}").endswith(" ok installed")
    assert vm.check("systemctl is-active vllm@tiny.service").strip() == "active"
    rc, results, _ = deploy(fresh.site, [fresh.name])
    assert rc == 0 and results[fresh.name].changed == [], results


def test_removed_service_is_stopped_and_removed(fresh, tmp_path):
    site = copy.deepcopy(fresh.site_doc)
    site["groups"]["lab"]["vllm"]["services"] = []
    rc, results, _ = deploy(write(site, tmp_path / "site.yaml"), [fresh.name])
    assert rc == 0, results
    vm = fresh.vm
    assert vm.run("systemctl is-active vllm@tiny.service")[1].strip() != "active"
    assert vm.run("test -e /etc/vllm/tiny.yaml")[0] != 0


#: A later R580 release (real: 580.105.08) that the test publishes in the simulated repository.
PUBLISHED_LATER = "580.105.08"


def _deb(p, version: str) -> str:
    """The Debian version string of driver `version` in p's source and OS."""
    return desired.driver_deb_version(
        p.model_copy(update={"nvidia": p.nvidia.model_copy(update={"version": version})}))


def test_driver_bump_upgrades_through_holds_and_a_reboot(fresh, tmp_path):
    """The site opens the driver version (branch 580 only) and `gpunode lock` picks the
    newest release the (simulated) repository has; the deploy from that lock upgrades
    through the holds and a reboot, and the node then holds exactly the locked packages.
    A venv dependency removed by hand is put back from the locked, hash-checked set. A
    release NVIDIA publishes later changes nothing on redeploy, and `gpunode lock --update
    nvidia` moves the driver set alone."""
    versions = fresh.facts["driver_versions"]
    old, new = sorted(versions, key=_version)[0], sorted(versions, key=_version)[-1]
    assert fresh.profile.nvidia.version == old
    site = copy.deepcopy(fresh.site_doc)
    site["groups"]["lab"]["nvidia"]["version"] = None           # the lock decides
    site["nodes"] = {fresh.name: site["nodes"][fresh.name]}
    path = write(site, tmp_path / "site.yaml")
    locked = lock(path)
    assert locked[fresh.name]["nvidia"]["driver"] == new, "the lock must pick the newest"

    never = copy.deepcopy(site)
    never["defaults"]["reboot"] = "never"
    (tmp_path / "never").mkdir()
    shutil.copy(path.with_suffix(".lock"), tmp_path / "never" / "site.lock")
    rc, results, _ = deploy(write(never, tmp_path / "never" / "site.yaml"), [fresh.name])
    assert rc != 0, "policy never must stop with the host needing a reboot"
    assert "mismatch" in fresh.vm.run("nvidia-smi")[1] + fresh.vm.run("nvidia-smi")[2]
    # a venv off its set (a dependency removed by hand): the locked deploy syncs it back,
    # every wheel checked against the lock's hashes
    prefix = fresh.profile.vllm.prefix
    fresh.vm.check(f"sudo {prefix}/uv/bin/uv pip uninstall -q --python {prefix}/venv/bin/python "
                   "pyyaml")
    rc, results, _ = deploy(path, [fresh.name])
    assert rc == 0, results
    assert any("Install vLLM" in c for c in results[fresh.name].changed), results
    assert "--hash=sha256:" in fresh.vm.check(f"cat {prefix}/requirements.lock")
    smi = fresh.vm.check("nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    assert set(smi.split()) == {new}
    holds = fresh.vm.check("apt-mark showhold").split()
    driver = desired.driver_packages(fresh.profile)[0]
    assert set(desired.driver_packages(fresh.profile)) <= set(holds), holds
    assert any(h.startswith(("libcuda1", "libnvidia-compute")) for h in holds), holds
    # deployed from the lock: every locked NVIDIA package at its locked version, nothing off
    m = manifest(path, fresh.name)
    want = {n: i["version"] for n, i in locked[fresh.name]["nvidia"]["packages"].items()
            if managed_package(n)}             # the manifest records gpunode's packages
    assert {n: m["packages"].get(n) for n in want} == want
    assert m["driver_module"] == new
    rc, findings = drift(path, fresh.name)
    assert [f for f in findings if f["kind"] in ("lock", "file")] == [], findings
    # The reboot reset the (simulated) GPUs' volatile settings; the settings unit puts the
    # profile's back at boot, and the node proves out on the new driver as a whole.
    rc, out, _ = gpunode_cli("check", fresh.name, "--site", str(path))
    assert rc == 0, f"gpunode check after the driver bump failed:\n{out[-6000:]}"

    # NVIDIA publishes a later release: the node sees it, the locked deploy ignores it
    www, base = fresh.facts["www_root"], fresh.facts["base_url"]
    repo.build(www, base_url=base, driver_versions=(*versions, PUBLISHED_LATER))
    try:
        fresh.vm.check("sudo apt-get -q update", timeout=600)
        later = _deb(fresh.profile, PUBLISHED_LATER)
        assert later in fresh.vm.check(f"apt-cache madison {driver}")
        rc, results, _ = deploy(path, [fresh.name])
        assert rc == 0 and results[fresh.name].changed == [], results
        assert fresh.vm.check(f"dpkg-query -W -f '${{Version}}' {driver}") == \
            _deb(fresh.profile, new)
        assert lock(path) == locked, "`gpunode lock` without --update moved something"
        moved = lock(path, "nvidia")[fresh.name]
        assert moved["nvidia"]["driver"] == PUBLISHED_LATER
        assert moved["nvidia"]["packages"][driver]["version"] == later
        assert {g: e for g, e in moved.items() if g != "nvidia"} == \
            {g: e for g, e in locked[fresh.name].items() if g != "nvidia"}
    finally:
        repo.build(www, base_url=base)
        fresh.vm.run("sudo apt-get -q update", timeout=600)
