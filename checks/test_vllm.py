"""vLLM services: version, Triton's C toolchain, units, listening address, API answers,
placement on GPU-local CPUs and NUMA nodes, the API key and Hugging Face token kept secret,
unit hardening."""

from __future__ import annotations

import json

import pytest

from gpunode.checks import expect
from gpunode.core import desired
from gpunode.core.files import placements as compute_placements
from gpunode.core.topology import parse_cpulist

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _has_services(node):
    if not node.vllm.services:
        pytest.skip("no vLLM services on this node")


@pytest.fixture(scope="module")
def placements(node, facts):
    try:
        return compute_placements(node, facts.gpus)
    except ValueError as exc:
        pytest.fail(f"cannot compute the services' placement from the host's GPUs: {exc}",
                    pytrace=False)


def _check_each(node, check) -> list[str]:
    """Run check(service) -> problem or None for every service; collect the problems."""
    problems = []
    for svc in node.vllm.services:
        problem = check(svc)
        if problem:
            problems.append(f"{desired.vllm_unit(svc.name)}: {problem}")
    return problems


def test_vllm_version(node, facts):
    venv = f"{node.vllm.prefix}/venv"
    installed = facts.snap.data["venvs"].get(venv, {}).get("vllm")
    assert installed and expect.public_version(installed) == node.vllm.version, (
        f"vLLM in {venv} is {installed or 'not installed'}, expected {node.vllm.version}")
    if node.locked_vllm:  # deployed from a lock: exactly the locked set
        off = desired.venv_off_lock(node, facts.snap.data["venvs"].get(venv, {}))
        assert not off, f"{venv} is not the locked set: {', '.join(off)}"
    python = facts.cmd("venv_python")["out"].strip()
    assert python.startswith(f"Python {node.vllm.python}."), (
        f"{venv} runs {python or 'no python'}, expected Python {node.vllm.python}")


def test_triton_can_build_its_launchers(node, facts):
    """Triton compiles small C launcher modules at run time with the system C compiler
    against the venv Python's headers: the toolchain gpunode installs is there and a
    trivial extension builds and imports the same way (else the first request fails)."""
    missing = [n for n in desired.vllm_build_packages(node) if n not in facts.packages]
    assert not missing, f"packages Triton compiles with are not installed: {', '.join(missing)}"
    r = facts.cmd("triton_build")
    assert r["rc"] == 0, (f"{node.vllm.prefix}/venv/bin/python cannot build a C extension the "
                          f"way Triton does: {(r['err'] or r['out']).strip()[-800:]}")


def test_units_enabled_and_active(node, facts):
    def check(svc):
        u = facts.unit(desired.vllm_unit(svc.name))
        state = (u.get("UnitFileState"), u.get("ActiveState"), u.get("SubState"))
        if state != ("enabled", "active", "running"):
            return f"expected enabled/active/running, is {'/'.join(str(s) for s in state)}"
        return None

    problems = _check_each(node, check)
    assert not problems, expect.explain("vLLM units not running", problems)


def test_listening_where_configured(node, facts, vllm_probe):
    listeners = expect.parse_ss_listeners(facts.extra.get("listeners", {}).get("out", ""))

    def check(svc):
        pids = {int(p) for p in vllm_probe[svc.name]["pids"]}
        on_port = [x for x in listeners if x.port == svc.port]
        mine = [x for x in on_port if not x.pids or set(x.pids) & pids]
        if not mine:
            return (f"nothing of the unit listens on port {svc.port} (port {svc.port}: "
                    f"{[(x.address, x.pids) for x in on_port] or 'free'})")
        wrong = [x.address for x in mine if not expect.bound_ok(svc.host, x.address)]
        if wrong:
            return f"listens on {wrong} port {svc.port}, expected {svc.host}"
        return None

    problems = _check_each(node, check)
    assert not problems, expect.explain("vLLM listening address differs", problems)


def test_health(node, vllm_probe):
    def check(svc):
        r = vllm_probe[svc.name]["health"]
        return None if r.get("status") == 200 else f"/health answered {r.get('status')} " \
            f"{r.get('error') or r.get('body', '')[:200]}"

    problems = _check_each(node, check)
    assert not problems, expect.explain("vLLM /health not 200", problems)


def test_models_lists_served_names(node, vllm_probe):
    def check(svc):
        r = vllm_probe[svc.name]["models_key"]
        if r.get("status") != 200:
            return f"/v1/models with the key answered {r.get('status')} {r.get('error', '')}"
        try:
            ids = [m["id"] for m in json.loads(r["body"]).get("data", [])]
        except (ValueError, KeyError, TypeError) as exc:
            return f"/v1/models answer is not a model list: {exc}"
        missing = [n for n in svc.names if n not in ids]
        return f"/v1/models lists {ids}, missing {missing}" if missing else None

    problems = _check_each(node, check)
    assert not problems, expect.explain("served model names differ", problems)


def test_api_key_required(node, vllm_probe):
    def check(svc):
        if not svc.api_key_file:
            return None
        status = vllm_probe[svc.name]["models_nokey"].get("status")
        return None if status == 401 else f"/v1/models without the key answered {status}, " \
            "expected 401"

    if not any(s.api_key_file for s in node.vllm.services):
        pytest.skip("no service has an API key (api_key_file)")
    problems = _check_each(node, check)
    assert not problems, expect.explain("API key not enforced", problems)


def test_short_completion(node, vllm_probe):
    def check(svc):
        r = vllm_probe[svc.name].get("completion") or {}
        if r.get("status") != 200:
            return f"/v1/completions answered {r.get('status')} " \
                f"{r.get('error') or r.get('body', '')[:200]}"
        try:
            choices = json.loads(r["body"]).get("choices")
        except ValueError:
            choices = None
        return None if choices else "/v1/completions returned no choices"

    problems = _check_each(node, check)
    assert not problems, expect.explain("completion failed", problems)


def test_cpu_affinity(node, facts, vllm_probe, placements):
    online = parse_cpulist(facts.extra["cpus_online"])

    def check(svc):
        want = list(placements[svc.name].cpus) or online
        pids = vllm_probe[svc.name]["pids"]
        if not pids:
            return "no running process to check"
        wrong = {int(pid): info["cpus"] for pid, info in pids.items()
                 if parse_cpulist(info["cpus"] or "") != want}
        if wrong:
            return (f"CPU affinity differs: expected {expect.format_cpus(want)}, processes "
                    f"have {wrong} (Cpus_allowed_list)")
        return None

    problems = _check_each(node, check)
    assert not problems, expect.explain("vLLM CPU placement differs", problems)


def test_numa_policy(node, vllm_probe, placements):
    def check(svc):
        want = expect.expected_numa_policy(placements[svc.name])
        pids = vllm_probe[svc.name]["pids"]
        if not pids:
            return "no running process to check"
        wrong = {}
        for pid, info in pids.items():
            policies = info["policies"]
            actual = max(policies, key=policies.get) if policies else None
            if actual != want:
                wrong[int(pid)] = actual
        if wrong:
            return f"NUMA policy differs: expected {want}, processes have {wrong} (numa_maps)"
        return None

    problems = _check_each(node, check)
    assert not problems, expect.explain("vLLM NUMA placement differs", problems)


def _secret_problem(probe, prefix: str, what: str) -> str | None:
    """A credential file that is missing, not root-only, or whose content shows anywhere."""
    if not probe[f"{prefix}_read"]:
        return "the credential file is missing or empty"
    st = probe[f"{prefix}_stat"] or {}
    issues = []
    if st.get("uid") != 0 or int(st.get("mode", "0777"), 8) & 0o077:
        issues.append(f"credential file mode {st.get('mode')} uid {st.get('uid')}, "
                      "expected root-owned and not group/other readable")
    if probe[f"{prefix}_found_in"]:
        issues.append(f"{what} visible in: {probe[f'{prefix}_found_in']}")
    return "; ".join(issues) or None


def test_api_key_kept_secret(node, vllm_probe):
    """The key is readable only by root on the host and appears in no command line, unit
    file, managed file or journal."""
    def check(svc):
        if not svc.api_key_file:
            return None
        return _secret_problem(vllm_probe[svc.name], "key", "API key")

    if not any(s.api_key_file for s in node.vllm.services):
        pytest.skip("no service has an API key (api_key_file)")
    problems = _check_each(node, check)
    assert not problems, expect.explain("API key exposed", problems)


def test_hf_token_kept_secret(node, vllm_probe):
    """The Hugging Face token is readable only by root on the host and appears in no
    command line, environment file, unit file (server or prefetch) or journal."""
    if not node.vllm.hf_token_file:
        pytest.skip("no Hugging Face token (vllm.hf_token_file)")
    problems = _check_each(
        node, lambda svc: _secret_problem(vllm_probe[svc.name], "token", "Hugging Face token"))
    assert not problems, expect.explain("Hugging Face token exposed", problems)


def test_unit_exposure(node, vllm_probe):
    def check(svc):
        sec = vllm_probe[svc.name]["security"]
        score = expect.parse_exposure(sec["out"])
        if score is None:
            return f"systemd-analyze security gave no score: {sec['err'].strip()[:200]}"
        if score > expect.VLLM_EXPOSURE_MAX:
            return f"exposure {score} exceeds {expect.VLLM_EXPOSURE_MAX}"
        return None

    problems = _check_each(node, check)
    assert not problems, expect.explain("vLLM unit hardening weaker than declared", problems)


def test_vllm_files_match(facts):
    problems = facts.file_problems("vllm")
    assert not problems, expect.explain("vLLM files differ from the profile", problems)
