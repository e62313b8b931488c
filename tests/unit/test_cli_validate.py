"""`gpunode validate`, `inventory` and `schema`: exit codes, messages, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from site_docs import GUEST, NODE
from typer.testing import CliRunner, Result

from gpunode.cli.main import app
from gpunode.inventory import load_site

SVC = "    vllm:\n      services:\n"

# (id, site text, fragments the error output must contain)
BAD: list[tuple[str, str, list[str]]] = [
    ("unknown-key", NODE + "    tunning: {}\n",
     ["site.yaml:6: nodes.gpu01.tunning", "did you mean 'tuning'", "allowed: groups, connection"]),
    ("tab", "nodes:\n  gpu01:\n\tconnection: {address: h}\n",
     ["site.yaml:3:1: YAML syntax error", "tabs"]),
    ("tp-size", NODE + SVC + "        - {name: a, model: /m, gpus: [0, 1], "
     "tensor_parallel_size: 3}\n",
     ["nodes.gpu01.vllm.services[0].tensor_parallel_size: one vLLM server uses",
      "= 3 GPU(s), but gpus lists 2"]),
    ("missing-gpu", NODE + SVC + "        - {name: a, model: /m, gpus: [3]}\n",
     ["nodes.gpu01.vllm.services[0].gpus: GPU(s) [3] do not exist"]),
    ("duplicate-port", NODE + SVC + "        - {name: a, model: /m, gpus: [0], "
     "gpu_memory_utilization: 0.3}\n        - {name: b, model: /m, gpus: [1], "
     "gpu_memory_utilization: 0.3}\n",
     ["nodes.gpu01.vllm.services[1].port: port 8000 is already used"]),
    ("gpu-memory-sum", NODE + SVC + "        - {name: a, model: /m, gpus: [1], port: 1}\n"
     "        - {name: b, model: /m, gpus: [1], port: 2}\n",
     ["nodes.gpu01.vllm.services: GPU 1", "1.84"]),
    ("pcie-on-pc", GUEST + "      machine: pc\n      hostpci: [{mapping: a6000}]\n",
     ["nodes.vm1.vm.hostpci[0].pcie: pcie=1 needs machine q35"]),
    ("upper-case-pci", GUEST + "      hostpci: [{address: '0000:C1:00.0'}]\n",
     ["site.yaml:15: nodes.vm1.vm.hostpci[0].address"]),
    ("vm-memory-1g", GUEST + "      memory_mib: 65000\n      hugepages: '1024'\n",
     ["nodes.vm1.vm.memory_mib: 65000 MiB is not a multiple of 1024"]),
    ("hugepages-ram", NODE + "    memory_mib: 32768\n"
     "    tuning: {hugepages: {size: 1G, count: 30}}\n",
     ["nodes.gpu01.tuning.hugepages.count: 30 x 1G reserves 30720 MiB of 32768 MiB"]),
    ("unknown-group", "groups:\n  lab: {}\n" + NODE + "    groups: [labs]\n",
     ["nodes.gpu01.groups: unknown group 'labs' (did you mean 'lab'?)"]),
    ("no-nodes", "site: {name: empty}\n", ["nodes: a site needs at least one node"]),
    ("duplicate-key", NODE + "    os: debian-12\n    os: ubuntu-24.04\n",
     ["site.yaml:7:5: YAML syntax error: duplicate key 'os'"]),
    ("nccl-without-build", NODE + "    cuda: {version: '12.4'}\n"
     "    nccl: {enabled: true, version: 2.28.9}\n",
     ["nodes.gpu01.nccl.version: NCCL 2.28.9 is not built for CUDA 12.4 "
      "(libnccl2=2.28.9-1+cuda12.4 does not exist): NVIDIA builds it for CUDA 12.9, 13.0"]),
    ("no-revision", NODE + SVC + "        - {name: a, model: org/m, gpus: [0]}\n",
     ["nodes.gpu01.vllm.services[0].revision: a Hugging Face model needs a pinned revision"]),
]

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    result = runner.invoke(app, list(args), env=env)
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), result.exc_info
    return result


def test_validate_accepts_example(example: Path) -> None:
    result = invoke("validate", "--site", str(example))
    assert result.exit_code == 0, result.output
    for name in load_site(example).nodes:
        assert name in result.stdout
    assert "valid" in result.stdout


@pytest.mark.parametrize("text,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_validate_rejects_bad_input(write_site: Callable[..., Path], text: str,
                                    expected: list[str]) -> None:
    path = write_site(text)
    result = invoke("validate", "--site", str(path))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in expected:
        assert fragment in result.stderr, (fragment, result.stderr)
    for line in result.stderr.splitlines():
        assert line.startswith(str(path)), line


def test_validate_missing_site_file(tmp_path: Path) -> None:
    result = invoke("validate", "--site", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 2
    assert "absent.yaml: site file not found" in result.stderr


def test_validate_site_from_env_then_default(tmp_path: Path, write_site: Callable[..., Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    env_site = write_site(NODE.replace("gpu01", "n-env"), "env.yaml")
    (tmp_path / "inventory").mkdir()
    (tmp_path / "inventory" / "site.yaml").write_text(NODE.replace("gpu01", "n-def"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUNODE_SITE", raising=False)
    assert "n-def" in invoke("validate").stdout
    assert "n-env" in invoke("validate", env={"GPUNODE_SITE": str(env_site)}).stdout
    opt = write_site(NODE.replace("gpu01", "n-opt"), "opt.yaml")
    result = invoke("validate", "--site", str(opt), env={"GPUNODE_SITE": str(env_site)})
    assert "n-opt" in result.stdout and "n-env" not in result.stdout
    (tmp_path / "inventory" / "site.yaml").unlink()
    result = invoke("validate")
    assert result.exit_code == 2 and "inventory/site.yaml: site file not found" in result.stderr


@pytest.mark.parametrize("fmt", ["json", "ansible", "pyinfra"])
def test_inventory_formats(example: Path, fmt: str) -> None:
    result = invoke("inventory", "--site", str(example), "--format", fmt)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    site = load_site(example)
    if fmt == "json":
        assert data == {n: p.model_dump(mode="json") for n, p in site.nodes.items()}
    elif fmt == "ansible":
        assert set(data["_meta"]["hostvars"]) == set(site.nodes)
    else:
        assert {h for hosts in data.values() for h, _ in hosts} == set(site.nodes)


def test_inventory_unknown_format(example: Path) -> None:
    result = invoke("inventory", "--site", str(example), "--format", "yaml")
    assert result.exit_code == 2 and "--format" in result.stderr


def test_schema_command_matches_committed_copy(repo: Path) -> None:
    result = invoke("schema")
    assert result.exit_code == 0
    assert result.stdout == (repo / "schema" / "site.schema.json").read_text()


# --- the installed console script, as a user runs it -----------------------------------------

def run_gpunode(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = repo / ".venv" / "bin" / "gpunode"
    if not exe.exists():
        pytest.skip(f"{exe} not installed")
    env = {k: v for k, v in os.environ.items() if k != "GPUNODE_SITE"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_console_script_validates_examples(repo: Path) -> None:
    for example in sorted((repo / "inventory" / "examples").glob("*.yaml")):
        proc = run_gpunode(repo, "validate", "--site", str(example))
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", ["unknown-key", "tab", "tp-size"])
def test_console_script_bad_input(repo: Path, write_site: Callable[..., Path],
                                  case: str) -> None:
    _, text, expected = next(b for b in BAD if b[0] == case)
    path = write_site(text)
    proc = run_gpunode(repo, "validate", "--site", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in expected:
        assert fragment in proc.stderr


def test_bad_cases_are_really_bad_yaml_or_model(write_site: Callable[..., Path]) -> None:
    """Guard against a BAD case that fails for a reason other than the one it names:
    every case except the syntax ones parses as YAML."""
    for case, text, _ in BAD:
        if case in ("tab", "duplicate-key"):
            continue
        assert isinstance(yaml.safe_load(text), dict), case
