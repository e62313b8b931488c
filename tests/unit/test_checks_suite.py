"""The testinfra suite itself, without a GPU node: it collects on any host, runs against
this machine (local://) without crashing, and host_facts.py probes an API without letting
the key out."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKS = REPO / "checks"
CONCERNS = ("base", "nvidia_driver", "gpu_settings", "cuda", "container_toolkit", "dcgm",
            "tuning", "vllm", "pve_host")


def _pytest(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", str(CHECKS), "-p", "no:cacheprovider",
                           "-o", "addopts=", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_every_module_collects_on_a_host_without_gpus():
    site = REPO / "inventory" / "examples" / "lab.yaml"
    res = _pytest("--collect-only", "-q", "--strict-markers", "--hosts=local://", "--site",
                  str(site))
    assert res.returncode == 0, res.stdout + res.stderr
    for concern in CONCERNS:
        assert f"test_{concern}.py::" in res.stdout, concern


def test_markers_are_declared():
    res = _pytest("--markers", "--hosts=local://")
    for marker in ("gpu", "slow", "destructive", "pve_host"):
        assert f"@pytest.mark.{marker}:" in res.stdout


def test_invalid_site_is_a_usage_error(write_site):
    path = write_site("nodes:\n  n1:\n    gpus: {count: many}\n")
    res = _pytest("--collect-only", "--hosts=local://", "--site", str(path))
    assert res.returncode == 4
    assert "invalid site file" in res.stderr and "gpus.count" in res.stderr


def test_suite_runs_against_this_machine(write_site, tmp_path):
    """This machine is not a GPU node: checks fail or skip, each with a message; GPU checks
    skip for a profile that expects no GPUs; no check errors out of the fixtures."""
    site = write_site("nodes:\n  local:\n    os: debian-12\n    connection: {address: localhost}\n")
    results = tmp_path / "results.json"
    res = _pytest("--hosts=local://", "--site", str(site), "--gpunode-results", str(results),
                  "-m", "not slow", "-q", "--tb=no")
    assert res.returncode in (0, 1), res.stdout + res.stderr
    records = json.loads(results.read_text())["results"]
    assert {r["concern"] for r in records} == set(CONCERNS)
    assert all(r["host"] == "local" for r in records)
    assert not [r for r in records if r["outcome"] == "error"], res.stdout
    for r in records:
        if r["outcome"] in ("failed", "skipped"):
            assert r["message"], r
    assert all(r["outcome"] == "skipped" and "a check of Proxmox hosts" in r["message"]
               for r in records if r["concern"] == "pve_host")
    gpu_checks = [r for r in records if r["concern"] == "gpu_settings"]
    assert gpu_checks and all(r["outcome"] == "skipped" and "expects no GPUs" in r["message"]
                              for r in gpu_checks)
    sysctl = next(r for r in records if r["check"] == "test_sysctls")
    assert sysctl["outcome"] in ("passed", "failed")
    if sysctl["outcome"] == "failed":
        assert sysctl["message"].startswith("sysctl differ (expected, actual): {")


def _host_facts():
    spec = importlib.util.spec_from_file_location("host_facts", CHECKS / "host_facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class _Api(BaseHTTPRequestHandler):
    key = "k3y-never-printed"

    def log_message(self, *args):  # noqa: ANN002
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path == "/health":
            return self._send(200, {})
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(401, {"error": "Unauthorized"})
        return self._send(200, {"data": [{"id": "tiny-sim"}]})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(401, {"error": "Unauthorized"})
        return self._send(200, {"choices": [{"text": "hello"}]})


@pytest.fixture
def api():
    server = HTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_host_facts_probe_keeps_the_key_on_the_host(tmp_path, api):
    key_file = tmp_path / "tiny.key"
    key_file.write_text(_Api.key + "\n")
    key_file.chmod(0o600)
    leaky = tmp_path / "tiny.env"
    leaky.write_text(f"VLLM_API_KEY={_Api.key}\n")
    managed = tmp_path / "managed.conf"
    managed.write_text("a = 1\n")
    spec = {"contents": [str(managed), str(tmp_path / "absent")],
            "commands": {"echo": "echo hi"}, "mtimes": [str(tmp_path / "*.conf")],
            "listeners": True,
            "services": [{"name": "tiny", "unit": "vllm@gpunode-test-absent.service",
                          "address": "127.0.0.1", "port": api, "served": ["tiny-sim"],
                          "key_path": str(key_file), "scan_paths": [str(leaky)]}]}
    res = subprocess.run([sys.executable, str(CHECKS / "host_facts.py"), json.dumps(spec)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert _Api.key not in res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["contents"] == {str(managed): "a = 1\n", str(tmp_path / "absent"): None}
    assert out["cmds"]["echo"]["out"] == "hi\n"
    assert list(out["mtimes"]) == [str(managed)]
    probe = out["services"]["tiny"]
    assert probe["key_read"] and probe["key_stat"]["mode"] == "0600"
    assert probe["key_found_in"] == [str(leaky)]
    assert probe["health"]["status"] == 200
    assert probe["models_nokey"]["status"] == 401
    assert probe["models_key"]["status"] == 200 and "tiny-sim" in probe["models_key"]["body"]
    assert probe["completion"]["status"] == 200
    from gpunode.checks import expect

    listening = [x for x in expect.parse_ss_listeners(out["listeners"]["out"]) if x.port == api]
    assert listening and expect.bound_ok("127.0.0.1", listening[0].address)


def test_host_facts_probe_finds_the_hf_token_and_keeps_it_on_the_host(tmp_path, api):
    token = "hf_probeTestToken0123456789abc"
    token_file = tmp_path / "hf-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o644)  # group/other readable: the check must see the mode
    leaky = tmp_path / "tiny.env"
    leaky.write_text(f"HF_TOKEN={token}\n")
    spec = {"services": [{"name": "tiny", "unit": "vllm@gpunode-test-absent.service",
                          "address": "127.0.0.1", "port": api, "served": ["tiny-sim"],
                          "key_path": None, "token_path": str(token_file),
                          "token_units": ["vllm@gpunode-test-absent.service",
                                          "vllm-prefetch@gpunode-test-absent.service"],
                          "scan_paths": [str(leaky)]}]}
    res = subprocess.run([sys.executable, str(CHECKS / "host_facts.py"), json.dumps(spec)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert token not in res.stdout + res.stderr
    probe = json.loads(res.stdout)["services"]["tiny"]
    assert probe["token_read"] and probe["token_stat"]["mode"] == "0644"
    assert probe["token_found_in"] == [str(leaky)]
    assert not probe["key_read"] and probe["key_found_in"] == []


def test_host_facts_http_reports_refused_connections():
    hf = _host_facts()
    r = hf.http("GET", "http://127.0.0.1:9/health", timeout=2)
    assert r["status"] is None and r["error"]


def test_profile_from_ansible_inventory(tmp_path, write_site):
    """--hosts=ansible://...: the profile comes from the hostvar `node` (no --site)."""
    import os

    import yaml

    from gpunode.inventory import load_site, to_ansible

    site = load_site(write_site("nodes:\n  box1:\n    os: debian-12\n"
                                "    connection: {address: localhost}\n"))
    hostvars = to_ansible(site)["_meta"]["hostvars"]["box1"]
    hostvars.update(ansible_connection="local", ansible_become=False)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"box1": hostvars}}}))
    results = tmp_path / "results.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("GPUNODE_SITE", None)
    res = subprocess.run([sys.executable, "-m", "pytest", str(CHECKS), "-p", "no:cacheprovider",
                          "-o", "addopts=", "--hosts=ansible://box1",
                          f"--ansible-inventory={inventory}", "--gpunode-results", str(results),
                          "-k", "test_os_matches_profile or test_sysctls", "-q"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    records = {r["check"]: r for r in json.loads(results.read_text())["results"]}
    for record in records.values():  # an unresolved profile would make both errors
        assert record["outcome"] in ("passed", "failed"), res.stdout
        assert record["host"] == "box1"


@pytest.mark.skipif(not Path("/usr/bin/numactl").exists(), reason="numactl is not installed")
def test_process_placement_is_read_from_proc():
    """What systemd's CPUAffinity=/NUMAPolicy= do to a process, set here with numactl, is
    what host_facts reads: Cpus_allowed_list and the numa_maps policy."""
    from gpunode.checks import expect
    from gpunode.core.topology import Placement

    hf = _host_facts()
    proc = subprocess.Popen(["numactl", "--membind=0", "--physcpubind=0", "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until numactl has exec'd sleep
            if (hf.read(f"/proc/{proc.pid}/comm") or "").strip() == "sleep":
                break
            time.sleep(0.05)
        assert hf.status_field(proc.pid, "Cpus_allowed_list") == "0"
        policies = hf.policy_counts(proc.pid)
        want = expect.expected_numa_policy(Placement(("GPU-0",), (0,), (0,)))
        assert max(policies, key=policies.get) == want == "bind:0"
    finally:
        proc.kill()
        proc.wait()


def test_char_devices_read_back(tmp_path):
    """host_facts tells a character device (what nvidia-modprobe makes) from a plain file
    and from a missing path, and the shared read asks for the uvm nodes on a GPU node."""
    from gpunode.checks import expect
    from gpunode.core import desired

    hf = _host_facts()
    (tmp_path / "plain").write_text("")
    assert hf.is_char_device("/dev/null") is True
    assert hf.is_char_device(str(tmp_path / "plain")) is False
    assert hf.is_char_device(str(tmp_path / "absent")) is None
    site = REPO / "inventory" / "examples" / "lab.yaml"
    from gpunode.inventory import load_site

    node = load_site(site).nodes["labgpu1"]
    assert expect.core_spec(node)["char_devices"] == list(desired.UVM_DEVICES)


def _offline_security_supported() -> bool:
    import shutil

    if not shutil.which("systemd-analyze"):
        return False
    res = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True,
                         text=True)
    return "--offline" in res.stdout


@pytest.mark.skipif(not _offline_security_supported(),
                    reason="systemd-analyze security --offline is not available")
def test_rendered_vllm_unit_meets_the_exposure_threshold(tmp_path):
    """The unit the deploy writes scores at or below the suite's threshold (offline
    analysis of the rendered file; the check runs the same analysis on the live unit)."""
    from gpunode.checks import expect
    from gpunode.core.files import node_files
    from gpunode.inventory import load_site

    p = load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes["labgpu1"]
    unit = next(f for f in node_files(p, expect.placeholder_gpus(p))
                if f.path == "/etc/systemd/system/vllm@.service")
    path = tmp_path / f"vllm@{p.vllm.services[0].name}.service"
    path.write_text(unit.content)
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                          str(path)], capture_output=True, text=True, timeout=120)
    score = expect.parse_exposure(res.stdout)
    assert score is not None, res.stdout + res.stderr
    assert score <= expect.VLLM_EXPOSURE_MAX, f"exposure {score} > {expect.VLLM_EXPOSURE_MAX}"


@pytest.mark.skipif(not Path("/usr/bin/apt-config").exists(), reason="apt-config missing")
def test_unattended_blacklist_read_back_through_apt_config(tmp_path):
    """The rendered unattended-upgrades file, as apt itself reads it, lists every prefix
    the driver check expects (the check parses the same `apt-config dump`)."""
    from gpunode.checks import expect
    from gpunode.core import desired
    from gpunode.core.files import base_files
    from gpunode.inventory import load_site

    p = load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes["labgpu1"]
    f = next(f for f in base_files(p) if "unattended-upgrades" in f.path)
    conf = tmp_path / "uu.conf"
    conf.write_text(f.content)
    dump = subprocess.run(["apt-config", "-c", str(conf), "dump"], capture_output=True,
                          text=True, check=True).stdout
    listed = expect.apt_config_list(dump, "Unattended-Upgrade::Package-Blacklist")
    assert listed == list(desired.UNATTENDED_BLACKLIST)


def test_a_proxmox_host_gets_only_its_own_checks(write_site, tmp_path):
    """This machine as a pve-host: the pve_host checks run (and fail or skip with a
    message: it is no prepared Proxmox host), every other concern skips."""
    site = write_site("nodes:\n  local:\n    kind: pve-host\n    os: debian-12\n"
                      "    connection: {address: localhost}\n"
                      "    pve: {pci_mappings: [{name: a6000, addresses: ['0000:41:00']}]}\n")
    results = tmp_path / "results.json"
    res = _pytest("--hosts=local://", "--site", str(site), "--gpunode-results", str(results),
                  "-q", "--tb=no")
    assert res.returncode in (0, 1), res.stdout + res.stderr
    records = json.loads(results.read_text())["results"]
    ours = [r for r in records if r["concern"] == "pve_host"]
    assert len(ours) >= 8 and not [r for r in ours if r["outcome"] == "error"], res.stdout
    assert all(r["message"] for r in ours if r["outcome"] != "passed")
    missing = next(r for r in ours if r["check"] == "test_passthrough_devices_isolated")
    assert "0000:41:00 is not a PCI device on this host" in missing["message"]
    others = [r for r in records if r["concern"] != "pve_host"]
    assert others and all(r["outcome"] == "skipped" for r in others)
    assert any("test_pve_host.py only" in r["message"] for r in others)


def _checks_module(name: str):
    spec = importlib.util.spec_from_file_location(name, CHECKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class _Facts:
    """What test_vllm's toolchain check reads: dpkg's packages and one command's result."""

    def __init__(self, packages: dict[str, str], result: dict) -> None:
        self.packages = packages
        self.result = result

    def cmd(self, key: str) -> dict:
        return self.result if key == "triton_build" else {"rc": None, "out": "", "err": "not run"}


def _probe(python: str, **env: str) -> dict:
    """TRITON_BUILD_PROBE run as host_facts runs a command, by `python` on this machine."""
    import os

    from gpunode.checks import expect

    res = subprocess.run([python, "-c", expect.TRITON_BUILD_PROBE], capture_output=True,
                         text=True, timeout=120, env={**os.environ, **env})
    return {"rc": res.returncode, "out": res.stdout, "err": res.stderr}


def test_triton_toolchain_check_builds_an_extension_as_triton_does(tmp_path):
    """The check runs a real C extension build: it passes where the compiler and Python.h
    are, and fails with the compiler's words where the build fails or a package is missing."""
    import shutil
    import sysconfig

    from gpunode.checks import expect
    from gpunode.core import desired
    from gpunode.inventory import load_site

    if not (shutil.which("gcc") and Path(sysconfig.get_paths()["include"], "Python.h").exists()):
        pytest.skip("this machine has no gcc or no Python.h for this Python")
    p = load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes["labgpu1"]
    assert expect.core_spec(p)["commands"]["triton_build"] == expect.triton_build_command(p)
    assert expect.triton_build_command(p).startswith(f"{p.vllm.prefix}/venv/bin/python -c ")
    check = _checks_module("test_vllm").test_triton_can_build_its_launchers
    installed = dict.fromkeys(desired.vllm_build_packages(p), "1")
    ok = _probe(sys.executable, TMPDIR=str(tmp_path))
    assert ok["rc"] == 0 and "imported a C extension" in ok["out"], ok
    check(p, _Facts(installed, ok))
    with pytest.raises(AssertionError, match="cannot build a C extension the way Triton does"):
        check(p, _Facts(installed, _probe(sys.executable, CC=str(tmp_path / "no-cc"),
                                                   TMPDIR=str(tmp_path))))
    with pytest.raises(AssertionError, match="not installed: gcc"):
        check(p, _Facts({k: v for k, v in installed.items() if k != "gcc"}, ok))
    assert not list(tmp_path.glob("gpunode-cc-*"))  # the probe leaves nothing behind


def test_secret_check_names_mode_and_where_the_token_shows():
    module = _checks_module("test_vllm")
    good = {"token_read": True, "token_stat": {"mode": "0600", "uid": 0}, "token_found_in": []}
    assert module._secret_problem(good, "token", "Hugging Face token") is None
    loose = good | {"token_stat": {"mode": "0640", "uid": 0}}
    assert "mode 0640" in module._secret_problem(loose, "token", "Hugging Face token")
    shown = good | {"token_found_in": ["/etc/vllm/tiny.env"]}
    assert "Hugging Face token visible in: ['/etc/vllm/tiny.env']" == module._secret_problem(
        shown, "token", "Hugging Face token")
    assert "missing" in module._secret_problem(good | {"token_read": False}, "token", "x")


def test_module_check_fails_for_a_kernel_with_headers_but_no_module():
    from types import SimpleNamespace

    from gpunode.core import desired
    from gpunode.facts import Snapshot
    from gpunode.model import NodeProfile

    module = _checks_module("test_nvidia_driver")
    node = NodeProfile.model_validate({"name": "n", "os": "debian-12",
                                       "connection": {"address": "h"}, "gpus": {"count": 1}})
    built = {"headers": True, "nvidia": "/lib/modules/k/updates/dkms/nvidia.ko"}
    data = {"packages": {n: "1" for n in desired.driver_packages(node)},
            "kernel_modules": {"6.1.0-30-amd64": {"headers": True, "nvidia": None},
                               "6.1.0-31-amd64": built}}
    facts = SimpleNamespace(snap=Snapshot(data))
    with pytest.raises(AssertionError, match=r"no NVIDIA kernel module for kernel 6\.1\.0-30-amd64: "
                       r"apt-get install linux-headers-6\.1\.0-30-amd64 && dkms autoinstall"):
        module.test_module_present_for_every_kernel_that_may_boot(node, facts)
    data["kernel_modules"]["6.1.0-30-amd64"] = built
    module.test_module_present_for_every_kernel_that_may_boot(node, facts)
