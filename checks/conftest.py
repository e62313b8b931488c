"""The gpunode checks: a testinfra suite proving that a host is what its profile says.

Run it with a site file and the node names as hosts, e.g.
    pytest checks --site inventory/site.yaml --ssh-config ssh_config --hosts=paramiko://gpu01
or with gpunode's Ansible inventory (the hostvar `node` holds the resolved profile):
    pytest checks --hosts=ansible://gpu_nodes --ansible-inventory=inventory/ansible_inventory.py
`gpunode check` writes the ssh_config and runs this for you.

Every remote read happens once per host (module fixtures backed by a per-session cache):
one command for the shared facts, one for the vLLM probes, one for the (slow) initramfs
listing. No check changes the host."""

from __future__ import annotations

import base64
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpunode.checks import expect
from gpunode.core.files import node_files
from gpunode.core.topology import Gpu
from gpunode.facts import Snapshot, node_spec, snapshot_command
from gpunode.inventory import Site, SiteError, load_site, resolve_site_path
from gpunode.model import NodeProfile

HOST_SCRIPT = Path(__file__).with_name("host_facts.py")
MARKER = "@@gpunode-checks@@"
MARKERS = {
    "gpu": "needs the node's (real or simulated) NVIDIA GPUs; skipped where the profile "
           "expects none",
    "slow": "reads something slow (seconds on a VM), e.g. the initramfs listing",
    "destructive": "changes the host; the gpunode checks define none and never change a host",
    "pve_host": "a check of Proxmox VE hosts prepared for passthrough (kind pve-host only)",
}
SITE_KEY = pytest.StashKey[Site | None]()
RESULTS_KEY = pytest.StashKey["ResultRecorder"]()


# --- options, markers, results --------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpunode")
    group.addoption("--site", dest="gpunode_site", default=None,
                    help="gpunode site file (else $GPUNODE_SITE, else inventory/site.yaml); "
                         "hosts are matched to its nodes by name")
    group.addoption("--gpunode-results", dest="gpunode_results", default=None,
                    help="write one JSON record per check to this file (used by gpunode check)")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    option = config.getoption("gpunode_site", None)
    path = resolve_site_path(option)
    site: Site | None = None
    if option or os.environ.get("GPUNODE_SITE") or path.exists():
        try:
            site = load_site(path)
        except SiteError as exc:
            raise pytest.UsageError("invalid site file:\n" + "\n".join(exc.lines)) from None
    config.stash[SITE_KEY] = site
    out = config.getoption("gpunode_results", None)
    if out:
        recorder = ResultRecorder(Path(out))
        config.stash[RESULTS_KEY] = recorder
        config.pluginmanager.register(recorder, "gpunode-results")


def host_label(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    host = callspec.params.get("_testinfra_host") if callspec else None
    if host is None:
        return "local"
    backend = host.backend
    spec = getattr(backend, "host", None)
    name = getattr(spec, "name", None) or (spec if isinstance(spec, str) else None)
    return str(name or backend.get_hostname())


class ResultRecorder:
    """Writes one record per test: host, concern (the test file), outcome, message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hosts: dict[str, str] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.started = time.monotonic()

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            self.hosts[item.nodeid] = host_label(item)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rec = self.records.setdefault(report.nodeid, {
            "nodeid": report.nodeid,
            "host": self.hosts.get(report.nodeid, "local"),
            "concern": Path(report.location[0]).stem.removeprefix("test_"),
            "check": report.location[2].split("[", 1)[0],
            "outcome": "passed", "message": "", "duration_s": 0.0,
        })
        rec["duration_s"] = round(rec["duration_s"] + report.duration, 3)
        if report.failed:
            rec["outcome"] = "failed" if report.when == "call" else "error"
            rec["message"] = failure_text(report)
        elif report.skipped and rec["outcome"] == "passed":
            rec["outcome"] = "skipped"
            rec["message"] = failure_text(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        data = {"duration_s": round(time.monotonic() - self.started, 2),
                "results": list(self.records.values())}
        self.path.write_text(json.dumps(data, indent=1))


def failure_text(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # skip: (file, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return expect.clean_failure(crash.message)
    return expect.clean_failure(str(longrepr))[-2000:]


# --- which node, and what the host says -------------------------------------------------------

@dataclass
class HostFacts:
    """One host as read by the checks: the deploy's snapshot plus host_facts.py's extras."""

    profile: NodeProfile
    snap: Snapshot
    extra: dict[str, Any]
    read_s: float = 0.0
    vllm: dict[str, Any] | None = field(default=None)

    @property
    def gpus(self) -> list[Gpu]:
        return self.snap.gpus

    @property
    def packages(self) -> dict[str, str]:
        return self.snap.packages

    @property
    def holds(self) -> set[str]:
        return set(self.snap.holds)

    def unit(self, name: str) -> dict[str, str]:
        return self.extra["units"].get(name, {})

    def cmd(self, key: str) -> dict[str, Any]:
        return self.extra["cmds"].get(key, {"rc": None, "out": "", "err": "not run"})

    def content(self, path: str) -> str | None:
        return self.extra["contents"].get(path)

    def file_problems(self, concern: str) -> list[str]:
        """Managed files of one concern compared with gpunode.core.files.node_files."""
        problems = []
        try:
            files = node_files(self.profile, self.gpus, self.snap.thp_default)
        except ValueError as exc:  # the host lacks GPUs a service needs
            files = node_files(self.profile, None, self.snap.thp_default)
            plain = {f.path for f in files}
            if any(f.concern == concern and f.path not in plain
                   for f in node_files(self.profile, expect.placeholder_gpus(self.profile))):
                problems.append(f"files that depend on the GPUs cannot be computed: {exc}")
        chosen = [f for f in files if f.concern == concern]
        return problems + expect.file_problems(chosen, self.snap.data["files"],
                                               self.extra["contents"])


def script_command(spec: dict[str, Any]) -> str:
    """python3 running checks/host_facts.py on `spec` (no secret ever in the spec)."""
    code = base64.b64encode(HOST_SCRIPT.read_bytes()).decode()
    loader = "import base64,sys;exec(base64.b64decode(sys.argv.pop(1)))"
    return (f"python3 -c {shlex.quote(loader)} {code} "
            f"{shlex.quote(json.dumps(spec, sort_keys=True))}")


def run_json(host: Any, command: str, what: str) -> Any:
    result = host.run(command)
    if result.rc != 0:
        raise RuntimeError(f"reading {what} failed (exit {result.rc}): "
                           f"{(result.stderr or result.stdout).strip()[-1500:]}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"reading {what}: output is not JSON ({exc}): "
                           f"{result.stdout[:300]!r} {result.stderr[-500:]!r}") from None


def read_host(host: Any, p: NodeProfile) -> HostFacts:
    started = time.monotonic()
    if p.kind == "pve-host":  # the deploy's own snapshot holds all the PVE host checks read
        data = run_json(host, snapshot_command(node_spec(p)), "the host")
        return HostFacts(p, Snapshot(data), {}, read_s=time.monotonic() - started)
    snap_cmd = snapshot_command(node_spec(p))
    cmd = f"{snap_cmd}; echo; echo {MARKER}; {script_command(expect.core_spec(p))}"
    result = host.run(cmd)
    head, sep, tail = result.stdout.partition(f"\n{MARKER}\n")
    if not sep:
        raise RuntimeError(f"reading host facts failed (exit {result.rc}): "
                           f"{(result.stderr or result.stdout).strip()[-1500:]}")
    try:
        snap, extra = json.loads(head), json.loads(tail)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"reading host facts: bad output ({exc}); stderr: "
                           f"{result.stderr.strip()[-1500:]}") from None
    return HostFacts(p, Snapshot(snap), extra, read_s=time.monotonic() - started)


@pytest.fixture(scope="session")
def _gpunode_cache() -> dict[str, Any]:
    return {}


def _host_key(host: Any) -> str:
    return host.backend.get_pytest_id()


@pytest.fixture(scope="module")
def node(host: Any, request: pytest.FixtureRequest,
         _gpunode_cache: dict[str, Any]) -> NodeProfile:
    """The host's resolved profile (Ansible hostvar `node`, or the --site node)."""
    key = ("node", _host_key(host))
    if key not in _gpunode_cache:
        site = request.config.stash.get(SITE_KEY, None)
        backend = host.backend
        hostvars = backend.get_variables() if backend.NAME == "ansible" else None
        spec = getattr(backend, "host", None)
        name = getattr(spec, "name", None) or (spec if isinstance(spec, str) else None)
        port = getattr(spec, "port", None)
        try:
            _gpunode_cache[key] = expect.resolve_profile(
                site.nodes if site else None, name or backend.get_hostname(),
                int(port) if port else None, hostvars,
                site_path=str(site.path) if site else "the site")
        except expect.UnknownHost as exc:
            _gpunode_cache[key] = exc
    value = _gpunode_cache[key]
    if isinstance(value, Exception):
        pytest.fail(str(value), pytrace=False)
    return value


@pytest.fixture(scope="module")
def facts(host: Any, node: NodeProfile, _gpunode_cache: dict[str, Any]) -> HostFacts:
    """Everything the checks read from this host, read once per session."""
    key = ("facts", _host_key(host))
    if key not in _gpunode_cache:
        try:
            _gpunode_cache[key] = read_host(host, node)
        except Exception as exc:  # noqa: BLE001 - reported as each check's failure
            _gpunode_cache[key] = exc
    value = _gpunode_cache[key]
    if isinstance(value, Exception):
        pytest.fail(f"cannot read the host: {value}", pytrace=False)
    return value


@pytest.fixture(scope="module")
def vllm_probe(host: Any, node: NodeProfile, _gpunode_cache: dict[str, Any]) -> dict[str, Any]:
    """Per service: processes, key exposure, systemd-analyze security, HTTP answers."""
    key = ("vllm", _host_key(host))
    if key not in _gpunode_cache:
        try:
            _gpunode_cache[key] = run_json(host, script_command(expect.vllm_spec(node)),
                                           "the vLLM services")["services"]
        except Exception as exc:  # noqa: BLE001
            _gpunode_cache[key] = exc
    value = _gpunode_cache[key]
    if isinstance(value, Exception):
        pytest.fail(f"cannot read the host: {value}", pytrace=False)
    return value


@pytest.fixture(autouse=True)
def _applicable(request: pytest.FixtureRequest) -> None:
    """Skip GPU checks on nodes whose profile expects no GPUs; Proxmox hosts get only the
    pve_host checks, and other nodes none of those."""
    if "node" not in request.fixturenames:
        return
    p: NodeProfile = request.getfixturevalue("node")
    if (p.kind == "pve-host") != bool(request.node.get_closest_marker("pve_host")):
        pytest.skip("pve-host nodes are checked by test_pve_host.py only" if p.kind == "pve-host"
                    else f"a check of Proxmox hosts (this node is {p.kind})")
    if request.node.get_closest_marker("gpu") and p.gpus.count == 0:
        pytest.skip("the profile expects no GPUs (gpus.count is 0)")
