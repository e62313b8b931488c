"""What the checks expect and how they compare: pure helpers for `checks/` (testinfra).

Expected values come from the profile through `gpunode.core.desired`, `gpunode.core.files` and
`gpunode.core.topology`; this module only adds what those do not cover (paths to read before the
GPUs are known, parsers for tool output, comparisons that say what differs)."""

from __future__ import annotations

import difflib
import hashlib
import re
import shlex
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from gpunode.core import desired, paths
from gpunode.core.files import ManagedFile, node_files
from gpunode.core.topology import Gpu, Placement, format_cpulist
from gpunode.model import NodeProfile

#: Highest `systemd-analyze security` exposure a vLLM unit may have (0 = locked down,
#: 10 = unprotected). vllm@.service leaves PrivateDevices, PrivateNetwork and
#: MemoryDenyWriteExecute off on purpose (GPUs, NCCL, JIT), so it cannot reach ~1; the
#: rendered unit scores 3.2 with systemd 252 (offline analysis, tests/unit).
VLLM_EXPOSURE_MAX = 4.0

#: Config files `nvidia-ctk runtime configure` edits, per runtime (the deploy's own map).
RUNTIME_CONFIG = paths.RUNTIME_CONFIG

#: Longest diff excerpt put into a failure message (lines).
DIFF_LINES = 24


def placeholder_gpus(p: NodeProfile) -> list[Gpu]:
    """Stand-in GPUs with locality, only to learn the PATHS of files that depend on host
    facts (placement drop-ins, irqbalance) before the host has been read. One more GPU
    than the services use, on a CPU of its own, so the irqbalance ban is among the paths."""
    count = max([p.gpus.count, *(g + 1 for s in p.vllm.services for g in s.gpus)], default=0)
    return [Gpu(index=i, uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000", name=p.gpus.model,
                bus_id=f"00000000:{i + 1:02x}:00.0", memory_mib=None, driver_version="",
                cpus=[i], numa_node=0) for i in range(count + 1)]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def diff_excerpt(expected: str, actual: str, path: str) -> str:
    lines = list(difflib.unified_diff(expected.splitlines(), actual.splitlines(),
                                      f"{path} (expected)", f"{path} (host)", lineterm="", n=1))
    if len(lines) > DIFF_LINES:
        lines = lines[:DIFF_LINES] + [f"... ({len(lines) - DIFF_LINES} more diff lines)"]
    return "\n".join(lines)


def file_problems(expected: Iterable[ManagedFile], actual: Mapping[str, dict[str, Any] | None],
                  contents: Mapping[str, str | None] | None = None) -> list[str]:
    """Compare managed files with what the host has.

    `actual[path]` is the snapshot's file info ({"mode": "0644", "owner", "group",
    "sha256"} or None when missing); `contents[path]` the host's text, used for a diff."""
    problems: list[str] = []
    for f in expected:
        info = actual.get(f.path)
        if info is None:
            problems.append(f"{f.path}: missing (expected from {f.template})")
            continue
        if info.get("dir"):
            problems.append(f"{f.path}: is a directory, expected a file")
            continue
        mode = int(str(info.get("mode", "0")), 8)
        if mode != f.mode:
            problems.append(f"{f.path}: mode {mode:04o}, expected {f.mode:04o}")
        owner = (info.get("owner"), info.get("group"))
        if owner != (f.owner, f.group):
            problems.append(f"{f.path}: owner {owner[0]}:{owner[1]}, expected {f.owner}:{f.group}")
        want = sha256_text(f.content)
        if info.get("sha256") != want:
            text = (contents or {}).get(f.path)
            detail = (f"\n{diff_excerpt(f.content, text, f.path)}" if text is not None
                      else f" (sha256 {str(info.get('sha256'))[:12]}, expected {want[:12]})")
            problems.append(f"{f.path}: content differs from {f.template}{detail}")
    return problems


def map_diff(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (expected, actual)} for every key whose values differ (missing = None)."""
    return {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}


def normalize_sysctl(value: str | None) -> str | None:
    return None if value is None else " ".join(str(value).split())


# --- parsers of tool output ------------------------------------------------------------

def expected_numa_policy(placement: Placement) -> str:
    """The policy token /proc/<pid>/numa_maps shows for a service's placement."""
    policy = placement.numa_policy
    if not policy:
        return "default"
    return f"{policy}:{format_cpulist(list(placement.numa_nodes))}"


def numa_policies(numa_maps: str) -> Counter[str]:
    """Count the policy column of /proc/<pid>/numa_maps (e.g. {'bind:0': 40})."""
    counts: Counter[str] = Counter()
    for line in numa_maps.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            counts[parts[1]] += 1
    return counts


def dominant_numa_policy(numa_maps: str) -> str | None:
    """The process' own memory policy: mappings without their own policy show it, and
    they are the large majority of a process' mappings."""
    counts = numa_policies(numa_maps)
    return counts.most_common(1)[0][0] if counts else None


EXPOSURE = re.compile(r"Overall exposure level for \S+:\s*([0-9]+(?:\.[0-9]+)?)")


def parse_exposure(text: str) -> float | None:
    """`systemd-analyze security UNIT` -> its overall exposure (None if not found)."""
    m = EXPOSURE.search(text)
    return float(m.group(1)) if m else None


def parse_cdi_list(text: str) -> list[str]:
    """`nvidia-ctk cdi list` -> device names like 'nvidia.com/gpu=0' (log lines dropped)."""
    return [line.strip() for line in text.splitlines()
            if re.fullmatch(r"[\w.\-]+/[\w.\-]+=\S+", line.strip())]


def expected_cdi_devices(gpus: list[Gpu], kind: str = "nvidia.com/gpu") -> list[str]:
    """CDI names a complete spec has for these GPUs: by index, by UUID, and 'all'."""
    names = [f"{kind}={g.index}" for g in gpus] + [f"{kind}={g.uuid}" for g in gpus]
    return [*names, f"{kind}=all"]


def cdi_spec_devices(text: str) -> list[str]:
    """A CDI spec file -> its device names like 'nvidia.com/gpu=0' (none if it does not
    parse as a spec)."""
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    if not isinstance(spec, dict) or not isinstance(spec.get("devices"), list):
        return []
    return [f"{spec.get('kind')}={d['name']}" for d in spec["devices"]
            if isinstance(d, dict) and "name" in d]


def cdi_problems(p: NodeProfile, gpus: list[Gpu], spec_text: str | None,
                 listed: list[str]) -> list[str]:
    """The node's CDI spec (desired.cdi_spec) names every GPU, and `nvidia-ctk cdi list`
    (every spec in /etc/cdi and /var/run/cdi) names none twice: a second spec, such as the
    one gpunode generated into /etc/cdi before toolkit 1.18, makes CDI injection fail."""
    path = desired.cdi_spec(p)
    if spec_text is None:
        return [f"{path} is missing"]
    have = cdi_spec_devices(spec_text)
    problems = [f"{path} lacks {n}" for n in expected_cdi_devices(gpus) if n not in have]
    twice = sorted(n for n, c in Counter(listed).items() if c > 1)
    if twice:
        problems.append(f"more than one CDI spec defines {twice} (nvidia-ctk cdi list); "
                        f"only {path} should")
    return problems


DKMS_LINE = re.compile(r"^(?P<module>[^/\s]+)/(?P<version>[^,\s]+),\s*(?P<kernel>[^,\s]+),"
                       r"\s*(?P<arch>[^:\s]+):\s*(?P<state>.+)$")


def parse_dkms_status(text: str) -> list[dict[str, str]]:
    """`dkms status` (dkms 3) -> [{module, version, kernel, arch, state}]."""
    rows = []
    for line in text.splitlines():
        m = DKMS_LINE.match(line.strip())
        if m:
            rows.append(m.groupdict())
    return rows


def proc_driver_flavour(text: str | None) -> str | None:
    """/proc/driver/nvidia/version -> 'open' | 'proprietary' (None when not loaded)."""
    if not text:
        return None
    first = text.splitlines()[0] if text.splitlines() else ""
    if "NVRM version" not in first:
        return None
    return "open" if "Open Kernel Module" in first else "proprietary"


def proc_driver_version(text: str | None) -> str | None:
    if not text:
        return None
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def apt_config_list(text: str, key: str) -> list[str]:
    """Values of a list option in `apt-config dump` output (`Key "value";` lines)."""
    values = []
    prefix = key + " "
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(prefix) or line.startswith(key + "::"):
            m = re.search(r'"(.*)";$', line)
            if m and m.group(1):
                values.append(m.group(1))
    return values


def public_version(version: str) -> str:
    """PEP 440 public part: '0.33.0+gpunodesim' -> '0.33.0'."""
    return version.split("+", 1)[0]


def debian_upstream(version: str) -> str:
    """'1:4.4.2-1' -> '4.4.2'; '580.95.05-1' -> '580.95.05'."""
    return version.split(":", 1)[-1].rsplit("-", 1)[0]


def probe_address(host: str) -> str:
    """Where to reach a service bound to `host` from the host itself."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pids: tuple[int, ...]


def parse_ss_listeners(text: str) -> list[Listener]:
    """`ss -Htlnp` lines -> listeners with owning pids."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        local = parts[3]
        addr, _, port = local.rpartition(":")
        if not port.isdigit():
            continue
        addr = addr.strip("[]").split("%", 1)[0]
        pids = tuple(int(p) for p in re.findall(r"pid=(\d+)", line))
        out.append(Listener(addr, int(port), pids))
    return out


def bound_ok(want_host: str, listener_addr: str) -> bool:
    """Does a socket bound to `listener_addr` satisfy the configured listen address?"""
    if want_host in ("0.0.0.0", "::", ""):
        return listener_addr in ("0.0.0.0", "::", "*")
    return listener_addr == want_host


def clean_failure(message: str) -> str:
    """A failure message without pytest's prefixes and assertion rewriting tail."""
    for prefix in ("AssertionError: ", "Failed: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    cut = message.find("\nassert ")
    if cut >= 0:
        message = message[:cut]
    return message.strip()


#: PCIe link each GPU model supports (generation, lanes): research/domain.md §5 (RTX A6000:
#: PCIe 4.0 x16). Models not listed are checked only for a full-width link.
PCIE_LINK = {"NVIDIA RTX A6000": (4, 16)}


def expected_memory_mib(model: str, ecc_on: bool) -> int | None:
    """nvidia-smi memory.total of a known GPU model (ECC on reserves some), else None."""
    from gpunode.sizing.gpus import lookup_gpu
    from gpunode.sizing.shape import SizingError

    try:
        return lookup_gpu(model, ecc=ecc_on).memory_mib
    except SizingError:
        return None


def explain(title: str, problems: list[str]) -> str:
    """One failure message: a title and one line (or block) per problem."""
    return f"{title}:\n" + "\n".join(f"- {p}" for p in problems)


# --- which node is this host ------------------------------------------------------------

class UnknownHost(LookupError):
    """A checked host matches no node of the site."""


def resolve_profile(site_nodes: Mapping[str, NodeProfile] | None, name: str | None,
                    port: int | None = None, hostvars: Mapping[str, Any] | None = None,
                    site_path: str = "the site") -> NodeProfile:
    """The profile of a testinfra host: the Ansible hostvar `node` (the resolved profile as
    JSON), else the site node of that name, else the one node whose connection address
    (and port, when given) match."""
    if hostvars and isinstance(hostvars.get("node"), Mapping):
        from gpunode.inventory.adapters import ansible_plain

        return NodeProfile.model_validate(ansible_plain(hostvars["node"]))
    if not site_nodes:
        raise UnknownHost(f"host {name!r}: no site to take its profile from; pass --site "
                          "PATH (or set $GPUNODE_SITE), or run with --hosts=ansible://... "
                          "and gpunode's Ansible inventory (hostvar 'node')")
    if name and name in site_nodes:
        return site_nodes[name]
    matches = [p for p in site_nodes.values() if p.connection.address == name
               and (port is None or p.connection.port == port)]
    if len(matches) == 1:
        return matches[0]
    where = f"{name}:{port}" if port else str(name)
    why = "several nodes share that address; name the node" if matches else "no such node"
    raise UnknownHost(f"host {where!r} is not a node of {site_path} ({why}); known nodes: "
                      f"{', '.join(sorted(site_nodes))}. Use the node name as the host, e.g. "
                      f"--hosts=paramiko://{next(iter(sorted(site_nodes)))} with an ssh_config "
                      "(gpunode check writes one)")


# --- what to read from a host -------------------------------------------------------------

#: systemd properties the checks read for each unit.
UNIT_PROPS = ["LoadState", "ActiveState", "SubState", "UnitFileState", "MainPID",
              "CPUAffinity", "NUMAPolicy", "NUMAMask", "LimitNOFILE", "LimitMEMLOCK",
              "Environment", "NRestarts", "Result", "NeedDaemonReload", "DropInPaths"]
PERSISTENCED_UNIT = "nvidia-persistenced.service"
GPU_SETTINGS_UNIT = "gpunode-gpu-settings.service"
IRQBALANCE_UNIT = "irqbalance.service"
DCGM_UNIT = "nvidia-dcgm.service"
PCIE_QUERY = ("nvidia-smi --query-gpu=index,pcie.link.gen.max,pcie.link.width.max,"
              "pcie.link.width.current --format=csv,noheader,nounits")
NOUVEAU_BLACKLISTS = paths.NOUVEAU_BLACKLISTS


#: Builds and imports a trivial C extension the way Triton builds its launchers at run time
#: (triton/runtime/build.py): $CC, else gcc, else clang; the include directory of the
#: default sysconfig scheme (posix_prefix where Debian's Python says posix_local);
#: -O3 -shared -fPIC -Wno-psabi. Run by the venv's Python in a temporary directory that it
#: removes again; exits non-zero with the compiler's words when something is missing.
TRITON_BUILD_PROBE = r"""
import importlib.util, os, shutil, subprocess, sys, sysconfig, tempfile
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
if cc is None:
    sys.exit("no C compiler: $CC is unset and neither gcc nor clang is on PATH")
scheme = sysconfig.get_default_scheme()
include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
source = '''#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gpunode_cc_probe", NULL, -1, methods};
PyMODINIT_FUNC PyInit_gpunode_cc_probe(void) { return PyModule_Create(&module); }
'''
with tempfile.TemporaryDirectory(prefix="gpunode-cc-") as tmp:
    src = os.path.join(tmp, "main.c")
    so = os.path.join(tmp, "gpunode_cc_probe" + sysconfig.get_config_var("EXT_SUFFIX"))
    with open(src, "w") as f:
        f.write(source)
    r = subprocess.run([cc, src, "-O3", "-shared", "-fPIC", "-Wno-psabi", "-o", so,
                        "-I" + tmp, "-I" + include], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{cc} -I{include} failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    spec = importlib.util.spec_from_file_location("gpunode_cc_probe", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.answer() != 42:
        sys.exit(f"the module {cc} built answers {module.answer()!r}, not 42")
print(f"{cc} built and {sys.executable} imported a C extension (-I{include})")
"""


def triton_build_command(p: NodeProfile) -> str:
    """The venv's Python running TRITON_BUILD_PROBE (every path quoted)."""
    python = f"{p.vllm.prefix}/venv/bin/python"
    return f"{shlex.quote(python)} -c {shlex.quote(TRITON_BUILD_PROBE)}"


def checked_units(p: NodeProfile) -> list[str]:
    units = [PERSISTENCED_UNIT, GPU_SETTINGS_UNIT, IRQBALANCE_UNIT, *desired.vllm_units(p),
             *desired.cdi_refresh_units(p)]
    if p.tuning.governor:
        units.append(paths.CPU_GOVERNOR_UNIT)
    if p.dcgm.enabled:
        units.append(DCGM_UNIT)
    return units


def core_spec(p: NodeProfile) -> dict[str, Any]:
    """The host_facts.py spec of the one read every check shares."""
    commands: dict[str, str] = {
        "apt_config": "apt-config dump",
        "pcie": PCIE_QUERY,
    }
    if p.nvidia.source == "cuda-repo":
        commands["dkms"] = "dkms status 2>&1"
    if p.container_toolkit.enabled:
        commands["ctk_version"] = "nvidia-ctk --version"
        if p.container_toolkit.cdi:
            commands["cdi_list"] = "nvidia-ctk cdi list"
    if p.dcgm.enabled:
        commands["dcgmi_version"] = "dcgmi --version"
        commands["dcgmi_discovery"] = "dcgmi discovery -l"
    if p.cuda.enabled:
        commands["nvcc"] = f"{paths.cuda_toolkit_prefix(p.cuda.version)}/bin/nvcc --version"
    if p.vllm.services:
        commands["venv_python"] = f"{p.vllm.prefix}/venv/bin/python --version"
        commands["triton_build"] = triton_build_command(p)
    # the text of every file the deploy may write, to diff (never a credential)
    contents = sorted({f.path for f in node_files(p, placeholder_gpus(p))})
    if p.container_toolkit.enabled:
        contents += [RUNTIME_CONFIG[r] for r in p.container_toolkit.runtimes if r in RUNTIME_CONFIG]
        if "containerd" in p.container_toolkit.runtimes:
            contents.append(paths.CONTAINERD_CONFIG)
        if p.container_toolkit.cdi:
            contents.append(desired.cdi_spec(p))
    return {"contents": contents, "units": checked_units(p), "unit_props": UNIT_PROPS,
            "commands": commands, "mtimes": ["/boot/initrd.img-*", NOUVEAU_BLACKLISTS],
            "char_devices": list(desired.UVM_DEVICES) if p.gpus.count else [],
            "listeners": bool(p.vllm.services)}


def vllm_spec(p: NodeProfile, http_timeout: int = 30) -> dict[str, Any]:
    """The host_facts.py spec probing every vLLM service (HTTP, processes, key and token
    exposure)."""
    from gpunode.core.files import vllm_files
    from gpunode.core.paths import HF_TOKEN_PATH, credential_path

    managed = [f.path for f in vllm_files(p, placeholder_gpus(p))]
    services = []
    for s in p.vllm.services:
        services.append({
            "name": s.name, "unit": desired.vllm_unit(s.name),
            "address": probe_address(s.host), "port": s.port, "served": s.names,
            "key_path": credential_path(s.name) if s.api_key_file else None,
            # the node's Hugging Face token: searched for in both units of the service
            "token_path": HF_TOKEN_PATH if p.vllm.hf_token_file else None,
            "token_units": [desired.vllm_unit(s.name), desired.prefetch_unit(s.name)],
            # the service's own managed files (config, environment, drop-ins)
            "scan_paths": [path for path in managed
                           if f"/{s.name}." in path or f"@{s.name}." in path],
        })
    return {"services": services, "http_timeout": http_timeout}


def package_problems(pkgs: Iterable[Any], installed: Mapping[str, str], holds: Iterable[str],
                     hold: bool) -> list[str]:
    """Pinned packages (gpunode.core.desired.Pkg) against dpkg: installed, exact version, held."""
    held = set(holds)
    problems = []
    for pkg in pkgs:
        version = installed.get(pkg.name)
        if version is None:
            problems.append(f"{pkg.name}: not installed")
            continue
        if pkg.version and version != pkg.version:
            problems.append(f"{pkg.name}: version {version}, expected {pkg.version}")
        if hold and pkg.version and pkg.name not in held:
            problems.append(f"{pkg.name}: not held (apt-mark hold)")
    return problems


def format_cpus(cpus: Iterable[int]) -> str:
    return format_cpulist(list(cpus)) or "(none)"
