"""gpunode.engines.ansible.plan: the decisions the Ansible roles act on, from a snapshot (the same
data the pyinfra deploy reads), on a fresh host and on a converged one (both SIMULATED
snapshots from tests/snapshot_fixtures.py and built here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from snapshot_fixtures import UUID, fresh_snapshot, with_gpu

from gpunode.core import desired, paths, plan
from gpunode.core.files import credentials
from gpunode.engines.ansible import plan as ansible_plan
from gpunode.inventory import load_site

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def profile():
    return next(iter(load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes.values()))


def test_fresh_host_needs_everything(profile):
    plan = ansible_plan.observed(profile, fresh_snapshot())
    want = ansible_plan.desired(profile)
    assert plan["refusal"] is None
    assert not any(plan["files_ok"].values())
    assert plan["todo"]["base"] == [p for p in desired.base_packages(profile) if p != "python3"]
    assert plan["todo"]["driver"] == desired.driver_packages(profile)
    assert plan["todo"]["headers"] == ["linux-headers-amd64", "linux-headers-6.1.0-30-amd64"]
    assert plan["todo"]["vllm"] == ["gcc", "libc6-dev", "python3.11-dev"]  # Triton's toolchain
    assert plan["sysctl_differs"] and plan["thp_differs"] and plan["user_missing"]
    assert plan["block_differs"] == ["vda"]  # the CD-ROM is no disk gpunode tunes
    assert all(s["needed"] for name, s in plan["stamps"].items()
               if name not in ("cdi", "cdi-refresh"))
    assert plan["stamps"]["cdi"] == {"path": "/var/lib/gpunode/cdi.stamp", "needed": False,
                                     "command": None}  # no GPUs visible yet
    assert plan["placement_files"] == {"tuning": [], "vllm": []}
    assert set(plan["parents_needed"]["vllm"]) >= {"/etc/vllm", "/usr/local/lib/gpunode"}
    assert want["files"]["nvidia_driver"][0]["template"].startswith("nvidia_driver/")


def test_disks_differ_on_read_ahead_or_an_offered_scheduler_only(profile):
    data = fresh_snapshot()
    vda = data["block"]["vda"]
    vda.update(scheduler="mq-deadline", read_ahead_kb=4096)
    assert ansible_plan.observed(profile, data)["block_differs"] == []
    vda["read_ahead_kb"] = 128
    assert ansible_plan.observed(profile, data)["block_differs"] == ["vda"]
    # a scheduler the kernel does not offer for the disk is no step: the checks report it
    vda.update(read_ahead_kb=4096, scheduler="none", schedulers=["none"])
    assert ansible_plan.observed(profile, data)["block_differs"] == []
    # ... while the checks, which judge from the same list, still see it
    assert plan.block_mismatches(profile, data) == [
        ("vda", "scheduler", "none", "mq-deadline", ["none"])]
    data["block"]["nvme0n1"] = {"scheduler": "mq-deadline", "schedulers": ["mq-deadline", "none"],
                                "read_ahead_kb": 4096}
    assert ansible_plan.observed(profile, data)["block_differs"] == ["nvme0n1"]
    assert desired.block_wanted(profile, "nvme0n1") == ("none", 4096)
    assert desired.block_wanted(profile, "nvme0n1p1") is None  # partitions follow the disk
    assert desired.block_wanted(profile, "dm-0") is None
    off = profile.model_copy(update={"tuning": profile.tuning.model_copy(
        update={"block_io": profile.tuning.block_io.model_copy(update={"enabled": False})})})
    assert ansible_plan.observed(off, data)["block_differs"] == []


def test_a_host_lacking_only_the_triton_toolchain_refreshes_apt_and_installs_it(profile):
    """Was: no set held gcc, libc6-dev or python3.X-dev, so neither engine installed them."""
    data = fresh_snapshot()
    todo = ansible_plan.observed(profile, data)["todo"]
    for name, specs in todo.items():
        if name != "vllm":
            for spec in specs:
                pkg, _, version = spec.partition("=")
                data["packages"][pkg] = version or "1"
    plan = ansible_plan.observed(profile, data)
    assert plan["todo"] == {**dict.fromkeys(todo, []), "vllm": desired.vllm_build_packages(profile)}
    assert plan["apt_refresh"]


def test_wrong_os_is_refused_with_the_pyinfra_words(profile):
    data = fresh_snapshot()
    data["os"] = {"id": "ubuntu", "version_id": "24.04"}
    plan = ansible_plan.observed(profile, data)
    assert plan["refusal"] == (f"{profile.name}: the profile says debian-12 but the host "
                               "runs ubuntu 24.04; nothing was changed")


def test_a_host_without_grub_is_refused_while_its_kernel_arguments_are_missing(profile):
    """Was: the deploy wrote the GRUB drop-in and died on `grub-mkconfig: not found`."""
    data = fresh_snapshot()
    data["boot"] = ["systemd-boot", "/etc/kernel/cmdline"]
    plan = ansible_plan.observed(profile, data)
    missing = " ".join(desired.missing_kernel_args(profile, data["cmdline"]))
    assert plan["refusal"] == (
        f"{profile.name}: the kernel command line lacks {missing}, and gpunode sets kernel "
        "arguments through GRUB, which this host does not have (no update-grub or "
        "grub-mkconfig; found: systemd-boot, /etc/kernel/cmdline); nothing was changed. Add "
        "them through the host's boot loader and reboot, or install GRUB")
    # arguments already on the command line: nothing to refuse, and no GRUB update to run
    data["cmdline"] += " " + " ".join(desired.kernel_args(profile))
    plan = ansible_plan.observed(profile, data)
    assert plan["refusal"] is None and not plan["stamps"]["grub"]["needed"]
    data["boot"] = []
    assert "found: no boot loader gpunode knows" in ansible_plan.observed(
        profile, {**data, "cmdline": ""})["refusal"]


def test_files_already_right_are_reported_ok_unless_told_not_to(profile):
    data = fresh_snapshot()
    for jobs in ansible_plan.desired(profile)["files"].values():
        for job in jobs:
            data["files"][job["path"]] = {"sha256": job["sha256"], "mode": job["mode"],
                                          "owner": job["owner"], "group": job["group"]}
    first = next(iter(data["files"]))
    data["files"][first] = {**data["files"][first], "mode": "0600"}
    plan = ansible_plan.observed(profile, data)
    secret = {c.path for c in credentials(profile)}  # their content is never in the plan
    assert [p for p, ok in plan["files_ok"].items() if not ok and p not in secret] == [first]
    slow = ansible_plan.observed(profile, data, skip_unchanged=False)
    assert not any(slow["files_ok"].values())


def test_stamp_is_satisfied_by_the_content_its_command_writes(profile):
    plan = ansible_plan.observed(profile, fresh_snapshot())
    grub = plan["stamps"]["grub"]
    key = next(j for j in ansible_plan.desired(profile)["files"]["tuning"]
               if j["path"] == paths.GRUB_CFG)["sha256"]
    assert f"printf '%s\\n' {key} > {grub['path']}" in grub["command"]
    data = fresh_snapshot()
    data["files"][grub["path"]] = {"sha256": hashlib.sha256(f"{key}\n".encode()).hexdigest(),
                                   "mode": "0644", "owner": "root", "group": "root"}
    assert not ansible_plan.observed(profile, data)["stamps"]["grub"]["needed"]


def _stamp_file(key: str) -> dict:
    return {"sha256": hashlib.sha256(f"{key}\n".encode()).hexdigest(), "mode": "0644",
            "owner": "root", "group": "root"}


def test_toolkit_118_keeps_the_cdi_spec_through_its_refresh_units(profile):
    """Was: gpunode wrote /etc/cdi/nvidia.yaml itself beside the spec toolkit 1.18's
    nvidia-cdi-refresh.service writes to /var/run/cdi (every device listed twice)."""
    assert profile.container_toolkit.version.startswith("1.18")
    assert ansible_plan.desired(profile)["cdi_refresh_units"] == [
        "nvidia-cdi-refresh.path", "nvidia-cdi-refresh.service"]
    data = with_gpu(fresh_snapshot())
    plan = ansible_plan.observed(profile, data)
    assert {"nvidia-cdi-refresh.path", "nvidia-cdi-refresh.service"} <= set(plan["units"])
    refresh = plan["stamps"]["cdi-refresh"]
    assert refresh["needed"] and refresh["command"].startswith(
        "systemctl start nvidia-cdi-refresh.service && test -s /var/run/cdi/nvidia.yaml && ")
    assert "/etc/cdi" not in refresh["command"] and plan["etc_cdi_cleanup"] is None
    # refreshed for this driver and these GPUs, the spec there: nothing to do
    data["files"][refresh["path"]] = _stamp_file(f"580.95.05 {UUID}")
    data["files"][paths.CDI_SPEC] = {"sha256": "0" * 64, "mode": "0644", "owner": "root",
                                       "group": "root"}
    assert not ansible_plan.observed(profile, data)["stamps"]["cdi-refresh"]["needed"]
    # the spec gone (its boot run skipped) or another driver: start the service again
    del data["files"][paths.CDI_SPEC]
    assert ansible_plan.observed(profile, data)["stamps"]["cdi-refresh"]["needed"]
    data["files"][paths.CDI_SPEC] = {"sha256": "0" * 64}
    assert ansible_plan.observed(profile, with_gpu(data, "580.126.09"))["stamps"][
        "cdi-refresh"]["needed"]
    # the spec gpunode generated into /etc/cdi earlier (its cdi stamp says so) goes
    data["files"]["/var/lib/gpunode/cdi.stamp"] = _stamp_file(f"580.95.05 {UUID}")
    assert ansible_plan.observed(profile, data)["etc_cdi_cleanup"] == (
        "rm -f /etc/cdi/nvidia.yaml /var/lib/gpunode/cdi.stamp")


def test_toolkit_117_has_no_refresh_units_so_gpunode_generates_the_spec(profile):
    ctk = profile.container_toolkit.model_copy(update={"version": "1.17.8"})
    p = profile.model_copy(update={"container_toolkit": ctk})
    assert ansible_plan.desired(p)["cdi_refresh_units"] == []
    data = with_gpu(fresh_snapshot())
    data["files"]["/var/lib/gpunode/cdi.stamp"] = _stamp_file("580.82.07 " + UUID)
    plan = ansible_plan.observed(p, data)
    assert plan["stamps"]["cdi"]["needed"] and plan["etc_cdi_cleanup"] is None
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in plan["stamps"]["cdi"][
        "command"]
    assert "nvidia-cdi-refresh.path" not in plan["units"]


def test_reboot_reasons_and_message_match_the_pyinfra_deploy(profile):
    data = fresh_snapshot()
    data["packages"].update({name: f"{profile.nvidia.version}-1"
                             for name in desired.driver_packages(profile)})
    plan = ansible_plan.observed(profile, data)
    assert plan["reboot_reasons"] == [
        "nouveau is loaded; the NVIDIA driver can load only after a reboot"]
    assert plan["reboot_message"].startswith(f"{profile.name} needs a reboot (nouveau is loaded")
    assert plan["reboot_message"].endswith(
        "and its reboot policy is 'never': reboot it, then run the deploy again")


def test_both_engines_refuse_to_reboot_into_a_kernel_without_the_nvidia_module(
        profile, monkeypatch):
    """Was: both rebooted into the newest kernel though DKMS had built no module for it (no
    headers), and the host came back without GPUs."""
    from gpunode.engines.pyinfra import ops
    from gpunode.facts import Snapshot

    data = fresh_snapshot()
    data["packages"].update({name: f"{profile.nvidia.version}-1"
                             for name in desired.driver_packages(profile)})
    new = "6.1.0-31-amd64"
    data["kernels"] = ["6.1.0-30-amd64", new]
    data["kernel_modules"] = {
        "6.1.0-30-amd64": {"headers": True, "nvidia": "/lib/modules/x/updates/dkms/nvidia.ko"},
        new: {"headers": False, "nvidia": None}}
    refusal = ansible_plan.observed(profile, data)["reboot_refusal"]
    assert refusal.startswith(f"{profile.name} needs a reboot (nouveau is loaded")
    assert f"missing for kernel {new} (it boots {new} next)" in refusal
    assert f"dkms autoinstall -k {new}" in refusal

    # pyinfra: the reboot operation stops the host with the same words, and does not reboot
    monkeypatch.setattr(ops, "snapshot", lambda p: Snapshot(data))
    commands = list(ops.reboot_if_needed._inner(p=profile))
    assert len(commands) == 1
    logged = []

    class Host:
        def log_styled(self, message, **kw):
            logged.append(message)

    assert commands[0].function(None, Host()) is False
    assert logged == [ops.STOP_PREFIX + refusal]

    # Ansible: the role stops on it before stopping vLLM or rebooting
    tasks = yaml.safe_load((REPO / "roles/gpunode_reboot/tasks/main.yml").read_text())
    stop = next(i for i, t in enumerate(tasks)
                if "reboot_refusal" in str(t.get("ansible.builtin.fail", {}).get("msg")))
    assert "reboot_refusal is not none" in tasks[stop]["when"]
    assert stop < min(i for i, t in enumerate(tasks)
                      if "ansible.builtin.reboot" in t or "ansible.builtin.shell" in t)

    # the module built for every kernel that may boot: no refusal, the reboot goes ahead
    data["kernel_modules"][new] = {"headers": True, "nvidia": "/lib/modules/y/nvidia.ko"}
    assert ansible_plan.observed(profile, data)["reboot_refusal"] is None


def test_held_driver_packages_and_stale_versions(profile):
    data = fresh_snapshot()
    pinned = f"{profile.nvidia.version}-1"
    data["packages"].update({"nvidia-driver-cuda": "580.1.2-1", "libcuda1": pinned,
                             "nvidia-container-toolkit": "1.18.0-1"})
    data["holds"] = ["libcuda1"]
    plan = ansible_plan.observed(profile, data)
    assert plan["stale_driver"] == ["nvidia-driver-cuda"]
    assert plan["missing_holds"]["driver"] == ["nvidia-driver-cuda"]


def test_the_nccl_check_runs_only_while_the_pinned_libnccl2_is_to_install(profile):
    """Both engines take it from plan.nccl_check: before installing, never on a host that
    already has the build (its repository may since have dropped it)."""
    from gpunode.core import hostcmd

    def nccl(enabled: bool):
        return profile.model_copy(update={"nccl": profile.nccl.model_copy(
            update={"enabled": enabled})})

    assert ansible_plan.observed(nccl(False), fresh_snapshot())["nccl_check"] is None
    p = nccl(True)
    data = fresh_snapshot()
    check = ansible_plan.observed(p, data)["nccl_check"]
    assert check == hostcmd.nccl_available(p) and check is not None
    lib = next(x for x in desired.nccl_packages(p) if x.name == "libnccl2")
    data["packages"][lib.name] = lib.version
    assert ansible_plan.observed(p, data)["nccl_check"] is None


def test_grub_drop_in_follows_the_kernel_thp_default_like_the_pyinfra_deploy(profile):
    """Was: transparent_hugepage=<thp> always, so an Ubuntu kernel (madvise built in) got a
    GRUB change and a reboot for nothing. The role writes `tuning_files` (with the host's
    kernel default) and the GRUB stamp follows the same content as tuning_files does."""
    from gpunode.core.files import tuning_files

    data = {**fresh_snapshot(), "boot": [], "thp_default": profile.tuning.thp}
    plan = ansible_plan.observed(profile, data)
    assert plan["refusal"] is None  # nothing to ask for on the command line
    grub = next(j for j in plan["tuning_files"] if j["path"] == paths.GRUB_CFG)
    pyinfra = next(f for f in tuning_files(profile, thp_default=profile.tuning.thp)
                   if f.path == paths.GRUB_CFG)
    assert grub["sha256"] == hashlib.sha256(pyinfra.content.encode()).hexdigest()
    assert grub["scope"] == {"kernel_args": ""} and "transparent_hugepage" not in pyinfra.content
    assert [j["path"] for j in plan["tuning_files"]] == [
        j["path"] for j in ansible_plan.desired(profile)["files"]["tuning"]]
    data["files"][paths.GRUB_CFG] = {"sha256": grub["sha256"], "mode": "0644",
                                       "owner": "root", "group": "root"}
    assert ansible_plan.observed(profile, data)["files_ok"][paths.GRUB_CFG]
    # a kernel built with another default, or none known: the argument is asked for
    for other in ("always", None):
        plan = ansible_plan.observed(profile, {**data, "boot": ["grub"], "thp_default": other})
        grub = next(j for j in plan["tuning_files"] if j["path"] == paths.GRUB_CFG)
        assert grub["scope"] == {"kernel_args": f"transparent_hugepage={profile.tuning.thp}"}
        assert not plan["files_ok"][paths.GRUB_CFG] and plan["stamps"]["grub"]["needed"]


def test_cpu_governor_unit_runs_on_drift_or_when_inactive(profile):
    """The role's decisions for the governor unit are the pyinfra deploy's functions
    (gpunode.core.plan.governor_needed) on the same snapshot; the unit is read by the snapshot."""
    from gpunode.core import plan as planner
    from gpunode.core.hostcmd import unit_names
    from gpunode.facts import Snapshot

    want = ansible_plan.desired(profile)
    assert want["cpu_governor"] == {"unit": paths.CPU_GOVERNOR_UNIT,
                                    "path": paths.CPU_GOVERNOR_UNIT_PATH}
    assert paths.CPU_GOVERNOR_UNIT_PATH in [j["path"] for j in want["files"]["tuning"]]
    assert paths.CPU_GOVERNOR_UNIT in unit_names(profile)
    data = {**fresh_snapshot(), "cpufreq": True, "governors": ["ondemand", "performance"]}
    data["units"][paths.CPU_GOVERNOR_UNIT] = {"UnitFileState": "enabled",
                                                "ActiveState": "active"}
    plan = ansible_plan.observed(profile, data)
    assert plan["governor_needed"] is planner.governor_needed(profile, Snapshot(data)) is True
    assert plan["units"][paths.CPU_GOVERNOR_UNIT] == {
        "enabled": True, "static": False, "active": True, "loaded": False}
    data["governors"] = [profile.tuning.governor]
    assert not ansible_plan.observed(profile, data)["governor_needed"]
    data["governors"] = []  # no cpufreq (a VM): nothing to compare
    assert not ansible_plan.observed(profile, data)["governor_needed"]
    data["units"][paths.CPU_GOVERNOR_UNIT]["ActiveState"] = "failed"
    assert ansible_plan.observed(profile, data)["governor_needed"]   # runs again
    assert ansible_plan.observed(profile, data)["governor_skipped"] is None
    assert ansible_plan.observed(profile, {**data, "cpufreq": False})["governor_skipped"] == (
        f"CPU governor {profile.tuning.governor} skipped: no cpufreq on this host (kvm)")
    data["governors"] = [profile.tuning.governor]
    none = profile.model_copy(update={"tuning": profile.tuning.model_copy(
        update={"governor": None})})
    assert ansible_plan.desired(none)["cpu_governor"] is None
    assert not ansible_plan.observed(none, {**data, "governors": ["powersave"]})[
        "governor_needed"]


def test_the_dkms_stop_comes_from_plan_dkms_refusal(profile):
    """Both engines stop a debian-12 host before its driver changes with the message
    plan.dkms_refusal gives from the snapshot (the pyinfra deploy through ops.refuse)."""
    from gpunode.core import hostcmd, plan
    from gpunode.facts import Snapshot

    data = fresh_snapshot()
    assert ansible_plan.observed(profile, data)["dkms_refusal"] is None
    data["cmds"] = {hostcmd.DKMS_OFFER_KEY: {"rc": 0, "out": (
        "dkms 3.0.10-8+deb12u1\nversion 580.95.05-1\ndepends dkms (>= 3.1.8)\n")}}
    got = ansible_plan.observed(profile, data)["dkms_refusal"]
    assert got is not None and got == plan.dkms_refusal(profile, Snapshot(data))
    assert "depends on dkms (>= 3.1.8)" in got
