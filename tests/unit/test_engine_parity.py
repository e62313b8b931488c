"""Both engines take the same actions with the same reasons, without a VM.

For SIMULATED snapshots of one host in several states (fresh, converged, drifted, mid driver
upgrade, the wrong OS), the pyinfra deploy's operations are prepared against the snapshot
(their command generators run, nothing executes) and each records the action it would take
(`ops.changing`'s tag, or the message of a stop); the Ansible side's actions are read from
what `gpunode_snapshot` returns (`ansible_plan.observed`) the way the roles act on it (each
`when:` the roles test, named once below in `ansible_actions`). The two lists must be the
same. The lab's state-parity tests then prove the same on real hosts, slowly."""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import Config, Inventory, State, StringCommand
from pyinfra.context import ctx_host, ctx_state
from snapshot_fixtures import fresh_snapshot, with_gpu

from gpunode.core import desired, paths
from gpunode.engines.ansible import plan as ansible_plan
from gpunode.engines.pyinfra import deploy_node, ops
from gpunode.facts import Snapshot, reboot_reasons
from gpunode.inventory import load_site
from gpunode.model import NodeProfile

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def profile(tmp_path, monkeypatch) -> NodeProfile:
    """The lab example's node, its API key file readable (relative to the working directory,
    as the example names it)."""
    monkeypatch.chdir(tmp_path)
    key = tmp_path / ".lab" / "keys" / "tiny.key"
    key.parent.mkdir(parents=True)
    key.write_text("sk-simulated-parity-test\n")
    (key.parent / "hf-token").write_text("hf_simulatedparitytest\n")
    return next(iter(load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes.values()))


def _apt(names: list[str]) -> str:
    return "apt:" + ",".join(sorted(n.partition("=")[0] for n in names))


def pyinfra_actions(p: NodeProfile, data: dict[str, Any], monkeypatch) -> Counter:
    """Prepare `deploy_node` for one host reading `data`; run every operation's command
    generator (no host is connected, nothing executes) and collect what each would do."""
    snap = Snapshot(copy.deepcopy(data))
    actions: list[str] = []
    monkeypatch.setattr(ops, "snapshot", lambda _p: snap)
    monkeypatch.setattr(ops, "changing", lambda tag, wrote=None: actions.append(tag))

    def stop(message: str) -> StringCommand:
        actions.append("stop: " + message)
        return StringCommand("false")

    monkeypatch.setattr(ops, "_stop", stop)
    inventory = Inventory(([p.name], {}))
    state = State(inventory=inventory, config=Config())
    host = inventory.get_host(p.name)
    with ctx_state.use(state), ctx_host.use(host):
        deploy_node(p)
        actions.clear()  # preparing already ran each generator up to its first command
        for op_hash in state.get_op_order():
            for _ in state.get_op_data_for_host(host, op_hash).command_generator():
                pass
    return Counter(_apt(a[4:].split(",")) if a.startswith("apt:") else a for a in actions)


def ansible_actions(p: NodeProfile, data: dict[str, Any]) -> Counter:
    """What the roles do with `gpunode_snapshot`'s answer on this host: each line is the
    `when:` of a role task (roles/gpunode_*/tasks), as the action pyinfra names the same."""
    obs = ansible_plan.observed(p, copy.deepcopy(data))
    want = ansible_plan.desired(p, thp_default=data.get("thp_default"))
    if obs["refusal"]:
        return Counter(["stop: " + obs["refusal"]])
    out: list[str] = []
    out += ["dpkg-configure"] if obs["dpkg_unfinished"] else []
    out += [path for path, ok in obs["files_ok"].items() if not ok]
    out += ["apt-update"] if obs["apt_refresh"] else []
    out += [_apt(specs) for specs in obs["todo"].values() if specs]
    out += ["sysctl"] if obs["sysctl_differs"] else []
    out += ["tmpfiles"] if obs["thp_differs"] else []
    out += ["block-io"] if obs["block_differs"] else []
    out += ["cpu-governor"] if obs["governor_needed"] else []
    out += [f"stamp:{name}" for name in _stamps_run(p, obs, want)]
    out += ["cdi-cleanup"] if obs["etc_cdi_cleanup"] else []
    out += ["keyring"] if obs["keyring_needed"] else []
    out += ["ctk-key"] if obs["ctk_key_needed"] else []
    out += ["hold" for names in obs["missing_holds"].values() if names]
    out += ["driver-version"] if obs["stale_driver"] else []
    out += [f"runtime:{r}" for r, lacks in obs["runtime_lacks"].items() if lacks]
    out += ["user"] if obs["user_missing"] else []
    out += ["venv"] if not obs["venv_ok"] else []
    out += [path for path, ok in obs["directories_ok"].items() if not ok]
    out += [f"removed:{s['name']}" for s in obs["stale_services"]]
    out += [obs["manifest"]["path"]] if not obs["manifest"]["ok"] else []
    out += ["gpu-settings"] if obs["gpu_settings_needed"] else []
    units = obs["units"]
    for name in [paths.CPU_GOVERNOR_UNIT] if want["cpu_governor"] else []:
        out += [f"unit:{name}"] if not units[name]["enabled"] else []
    persistenced = units[paths.PERSISTENCED_UNIT]
    out += [f"unit:{paths.PERSISTENCED_UNIT}"] * (
        (not persistenced["wanted"]) + (obs["smi_ok"] and not persistenced["active"]))
    gpu_settings = "gpunode-gpu-settings.service"
    out += [f"unit:{gpu_settings}"] if not units[gpu_settings]["enabled"] else []
    for name in want["cdi_refresh_units"]:
        out += [f"unit:{name}"] * ((not units[name]["enabled"])
                                   + (name.endswith(".path") and not units[name]["active"]))
    dcgm = units["nvidia-dcgm.service"]
    if p.dcgm.enabled:
        out += ["unit:nvidia-dcgm.service"] * (
            (not dcgm["enabled"]) + (obs["smi_ok"] and not dcgm["active"]))
    irq = units[paths.IRQBALANCE_UNIT]
    if want["irqbalance"] == "ban":
        out += [f"unit:{paths.IRQBALANCE_UNIT}"] * ((not irq["enabled"]) + (not irq["active"]))
    for svc in want["vllm"]["units"]:
        state = units[svc["unit"]]
        out += [f"unit:{svc['unit']}"] * (
            (not state["enabled"]) + (obs["smi_ok"] and not state["active"]))
    if obs["reboot_reasons"]:
        out += ["stop: " + obs["reboot_refusal"]] if obs["reboot_refusal"] else ["reboot"]
    return Counter(_apt(a[4:].split(",")) if a.startswith("apt:") else a for a in out)


def _block_as_wanted(p: NodeProfile, dev: str, got: dict[str, Any]) -> dict[str, Any]:
    want = desired.block_wanted(p, dev)
    return got if want is None else {**got, "scheduler": want[0], "read_ahead_kb": want[1]}


def _entry(digest: str, mode: str = "0644", owner: str = "root", group: str = "root") -> dict:
    return {"sha256": digest, "mode": mode, "owner": owner, "group": group}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _stamps_run(p: NodeProfile, obs: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The stamped commands the roles run: the CDI spec by the toolkit's refresh units
    (1.18 on) or by gpunode itself (1.17), not both."""
    refresh = bool(want["cdi_refresh_units"])
    run = {"grub": True, "initramfs": True, "cdi-refresh": refresh,
           "cdi": p.container_toolkit.enabled and p.container_toolkit.cdi and not refresh}
    return [name for name, stamp in obs["stamps"].items() if stamp["needed"] and run[name]]


def converged(p: NodeProfile) -> dict[str, Any]:
    """A host as a finished deploy leaves it (two GPUs, the driver loaded): the fresh host
    with every file, directory, package, hold, unit, stamp and setting both engines want,
    applied until the answer asks for nothing more (a file's content can depend on what the
    previous round installed: the GPU drop-ins, the manifest)."""
    want = p.nvidia.settings
    ecc = {} if want.ecc is None else {"ecc.mode.pending": "Enabled" if want.ecc else "Disabled"}
    data = with_gpu(fresh_snapshot(), driver=p.nvidia.version,
                    persistence_mode="Enabled" if want.persistence else "Disabled",
                    compute_mode=desired.COMPUTE_MODES[want.compute_mode],
                    **{"power.limit": str(want.power_limit_w or 0)}, **ecc)
    data.update(modules=["nvidia"], nvidia_proc_version=f"NVRM version: {p.nvidia.version}",
                apt_lists_mtime=2**31, users=["root", p.vllm.user],
                sysctl={k: " ".join(v.split()) for k, v in desired.sysctls(p).items()},
                thp={"enabled": p.tuning.thp, "defrag": p.tuning.thp_defrag},
                block={dev: _block_as_wanted(p, dev, got)
                       for dev, got in fresh_snapshot()["block"].items()},
                venvs={f"{p.vllm.prefix}/venv": {"vllm": p.vllm.version}})
    data["cmdline"] += " " + " ".join(desired.kernel_args(p, data.get("thp_default")))
    for runtime in p.container_toolkit.runtimes:
        if runtime != "podman":
            data["cmds"][f"grep:{paths.RUNTIME_CONFIG[runtime]}"] = {"rc": 0, "out": ""}
    data["files"][paths.CUDA_KEYRING] = _entry("k")
    data["files"][paths.CTK_KEYRING] = _entry("k")
    data["files"][paths.CDI_SPEC] = _entry("k")  # written by the toolkit's refresh unit
    data["packages"]["cuda-keyring"] = "1.1-1"
    data["globs"][paths.wants_glob("multi-user.target")] = [
        paths.wants_link("multi-user.target", paths.PERSISTENCED_UNIT)]
    for _ in range(4):
        obs = ansible_plan.observed(p, data)
        want = ansible_plan.desired(p, Snapshot(data).gpus, data.get("thp_default"))
        for specs in obs["todo"].values():
            for spec in specs:
                name, _, version = spec.partition("=")
                data["packages"][name] = version or "1"
        data["holds"] = sorted({*data["holds"], *(n for names in obs["missing_holds"].values()
                                                  for n in names)})
        for job in [j for jobs in want["files"].values() for j in jobs]:
            data["files"][job["path"]] = _entry(job["sha256"], job["mode"], job["owner"],
                                                job["group"])
        for cred in want["vllm"]["credentials"]:
            data["files"][cred["path"]] = _entry(_sha(Path(cred["source"]).read_text()),
                                                 "0600")
        for x in want["vllm"]["directories"]:
            data["files"][x["path"]] = {"mode": x["mode"], "owner": x["owner"],
                                        "group": x["group"], "dir": True}
        for stamp in (obs["stamps"][name] for name in _stamps_run(p, obs, want)):
            if stamp["command"]:
                key = stamp["command"].split("printf '%s\\n' ")[1].split(" > ")[0]
                data["files"][stamp["path"]] = _entry(_sha(key.strip("'") + "\n"))
        manifest = obs["manifest"]
        data["files"][manifest["path"]] = _entry(_sha(manifest["content"]), manifest["mode"])
        data["units"] = {u: {"UnitFileState": "enabled", "ActiveState": "active"}
                         for u in obs["units"]}
    return data


def test_fresh_host(profile, monkeypatch):
    data = fresh_snapshot()
    assert pyinfra_actions(profile, data, monkeypatch) == ansible_actions(profile, data)


def test_converged_host_both_do_nothing(profile, monkeypatch):
    data = converged(profile)
    assert ansible_actions(profile, data) == Counter()
    assert pyinfra_actions(profile, data, monkeypatch) == Counter()


def test_drifted_host_sysctl_unit_hold_and_file(profile, monkeypatch):
    data = converged(profile)
    key, value = next(iter(desired.sysctls(profile).items()))
    data["sysctl"][key] = value + "1"
    unit = desired.vllm_unit(profile.vllm.services[0].name)
    data["units"][unit]["ActiveState"] = "failed"
    held = sorted(data["holds"])[0]
    data["holds"].remove(held)
    drifted = next(path for path, f in data["files"].items()
                   if path.startswith("/etc/sysctl.d/") and not f.get("dir"))
    data["files"][drifted] = {**data["files"][drifted], "mode": "0666"}
    # the manifest records the holds, so it is written again too
    want = Counter(["sysctl", f"unit:{unit}", "hold", drifted, paths.MANIFEST_PATH])
    assert ansible_actions(profile, data) == want
    assert pyinfra_actions(profile, data, monkeypatch) == want


@pytest.mark.parametrize("installed", ["pin", "older"])
def test_host_mid_driver_upgrade(profile, monkeypatch, installed):
    """The old kernel module is still loaded and nvidia-smi fails with the version mismatch:
    the driver packages are at the pin already (the upgrade ran, the reboot did not) or still
    at an older release (both move them to the pin); both engines then reboot, as the lab
    example's reboot policy allows, and leave the GPU units as they are until then."""
    data = converged(profile)
    version = f"{profile.nvidia.version}-1" if installed == "pin" else "580.65.06-1"
    for name in desired.driver_packages(profile):
        data["packages"][name] = version
    data["nvidia_proc_version"] = "NVRM version: 580.65.06"
    data["nvidia_smi"] = {"present": True, "rc": 18, "query": "",
                          "error": "Failed to initialize NVML: Driver/library version mismatch"}
    assert any("mismatch" in r for r in reboot_reasons(profile, Snapshot(data)))
    got = ansible_actions(profile, data)
    assert got == pyinfra_actions(profile, data, monkeypatch)
    assert got["driver-version"] == (installed == "older")
    assert got["reboot"] == 1
    assert not [a for a in got if a.startswith("unit:")]


def test_refused_os_only_stops(profile, monkeypatch):
    data = fresh_snapshot()
    data["os"] = {"id": "ubuntu", "version_id": "22.04"}
    want = Counter([f"stop: {profile.name}: the profile says {profile.os} but the host runs "
                    "ubuntu 22.04; nothing was changed"])
    assert ansible_actions(profile, data) == want
    assert pyinfra_actions(profile, data, monkeypatch) == want


def test_the_comparison_sees_a_decision_one_engine_skips(profile, monkeypatch):
    """The harness can fail: a pyinfra deploy that forgets one decision differs."""
    from gpunode.core import plan

    data = fresh_snapshot()
    monkeypatch.setattr(plan, "thp_differs", lambda p, data: False)  # pyinfra's view only
    py = pyinfra_actions(profile, data, monkeypatch)
    monkeypatch.undo()
    assert py != ansible_actions(profile, data)
