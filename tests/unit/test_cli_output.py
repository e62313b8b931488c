"""CLI output that is read without a terminal (pipes, CI logs): sizing, validate and check
fit 100 columns and never split a word; every table has a JSON form; `--help` labels."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from gpunode.cli import check as checks_cli
from gpunode.cli import output

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "tests/fixtures/models"
WIDTH = 100


def gpunode(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run the CLI with stdout and stderr on pipes (not a terminal), as CI or `| less` does."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([sys.executable, "-m", "gpunode.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_fits(text: str, *sources: str) -> None:
    """No line over WIDTH columns; every word of `sources` appears whole in `text`."""
    long = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not long, f"lines over {WIDTH} columns:\n" + "\n".join(long)
    tokens = set(text.split())
    for source in sources:
        broken = [w for w in source.split() if w not in tokens]
        assert not broken, f"words split or cut: {broken[:5]}\n{text}"


# ------------------------------------------------------------------------------- sizing

@pytest.mark.parametrize("model,gpus", [
    ("llama-3.1-70b-instruct", "2xA6000"),      # fits nowhere: long reasons on every row
    ("llama-3.1-70b-instruct-awq", "2xA6000"),  # TP=1 fails, TP=2 fits
    ("mixtral-8x7b-instruct-v0.1", "4xA6000"),
])
def test_piped_sizing_fits_100_columns(model: str, gpus: str) -> None:
    args = ["sizing", str(MODELS / model), "--gpus", gpus, "--ctx", "32768"]
    plain, doc = gpunode(*args), gpunode(*args, "--json")
    assert plain.returncode == doc.returncode, plain.stderr
    data = json.loads(doc.stdout)
    reasons = [f["message"] for o in data["options"] for f in o["findings"][:2]]
    assert any(len(r) > 60 for r in reasons + data["recommendation"]["notes"]) or \
        model.endswith("awq")
    assert_fits(plain.stdout, *reasons, *data["recommendation"]["notes"])
    assert "┃" not in plain.stdout and "…" not in plain.stdout


def test_plain_table_keeps_words_whole_and_aligns_columns() -> None:
    text = ("KV cache holds 15,401 tokens (4.7 GiB/GPU) but max_model_len is 32,768; lower "
            "max_model_len to ≤ 15,401 or raise gpu_memory_utilization ") * 3
    cols = [output.Column("TP", "right"), output.Column("verdict"),
            output.Column("why", wrap=True)]
    lines = output.plain_table("title", cols, [["1", "fails", text], ["16", "fits", ""]], 80)
    assert lines[:2] == ["title", "TP  verdict  why"]
    assert lines[3].startswith(" 1  fails    KV cache")
    assert lines[-1] == "16  fits"
    assert_fits("\n".join(lines), text)
    assert max(len(line) for line in lines) <= 80
    # Too narrow for the fixed columns: one field per line, still whole words.
    many = [output.Column(f"column{i}") for i in range(12)]
    lines = output.plain_table("", many, [[f"value-{i}" for i in range(12)]], 60)
    assert "column11  value-11" in lines


# ----------------------------------------------------------------------------- validate

LOCAL_SITE = """
defaults:
  os: ubuntu-24.04
  gpus: {{model: NVIDIA RTX A6000, count: 3}}
nodes:
  gpu01:
    connection: {{address: 127.0.0.1}}
    vllm:
      services:
        - name: awq70b
          model: {awq}
          gpus: [0, 1]
          tensor_parallel_size: 2
          quantization: awq_marlin
          max_model_len: 32768
        - name: remote
          model: org/not-on-this-machine
          revision: 0123456789abcdef0123456789abcdef01234567
          gpus: [2]
          port: 8002
"""


@pytest.fixture
def local_site(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(LOCAL_SITE.format(awq=MODELS / "llama-3.1-70b-instruct-awq"))
    return path


def test_validate_says_per_service_whether_sizing_ran(local_site: Path, tmp_path: Path) -> None:
    # an empty cache: the remote model is not there. A short path (not pytest's tmp_path,
    # longer under xdist): the message names it, and a path is not broken across lines.
    env_hub = Path(tempfile.mkdtemp(prefix="hf-"))
    os.environ["HF_HOME"] = str(env_hub)
    try:
        proc = gpunode("validate", "--site", str(local_site))
        doc = json.loads(gpunode("validate", "--site", str(local_site), "--json").stdout)
        strict = gpunode("validate", "--site", str(local_site), "--require-sizing")
    finally:
        del os.environ["HF_HOME"]
        shutil.rmtree(env_hub, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    by_name = {s["service"]: s for s in doc["sizing"]}
    assert by_name["awq70b"]["ran"] and by_name["awq70b"]["verdict"] in ("fits", "warnings")
    remote = by_name["remote"]
    assert not remote["ran"] and remote["verdict"] == "not run"
    assert str(env_hub / "hub") in remote["reason"]
    assert "hf download org/not-on-this-machine config.json --revision" in remote["reason"]
    assert "sizing ran for 1 of 2 service(s)" in proc.stdout
    assert_fits(proc.stdout, remote["reason"], *(by_name["awq70b"]["warnings"]))
    assert strict.returncode == 2
    assert "services[1] (remote): sizing did not run (--require-sizing)" in strict.stderr


def test_piped_validate_of_the_examples_fits_100_columns(example: Path) -> None:
    proc = gpunode("validate", "--site", str(example))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(gpunode("validate", "--site", str(example), "--json").stdout)
    services = [", ".join(n["services"]) for n in doc["nodes"].values()]
    assert_fits(proc.stdout, *services, *(s["reason"] for s in doc["sizing"]))


# -------------------------------------------------------------------------------- check

def test_check_table_and_messages_fit_100_columns() -> None:
    message = ("sysctl differ (expected, actual): {'vm.swappiness': ('10', '11'), "
               "'kernel.numa_balancing': ('0', '1'), 'vm.max_map_count': ('1048576', '65530')}")
    records = [{"host": "gpu01", "concern": "tuning", "check": "test_sysctls",
                "outcome": "failed", "message": message, "duration_s": 0.5},
               {"host": "gpu01", "concern": "base", "check": "test_os", "outcome": "passed",
                "message": "", "duration_s": 0.1}]
    buf = io.StringIO()  # not a terminal
    checks_cli.print_table(Console(file=buf, width=WIDTH),
                           checks_cli.collate(records, ["gpu01"]))
    text = buf.getvalue()
    assert "gpu01  tuning        0       1        0  FAIL" in text
    assert_fits(text, message)


def test_piped_check_of_an_unreachable_host(tmp_path: Path) -> None:
    """End to end (pytest + testinfra in a subprocess): the table, the grouped failure and
    the summary, all within 100 columns; `--json -` puts the same report on stdout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    site = tmp_path / "site.yaml"
    site.write_text("nodes:\n  gpu01:\n    os: debian-12\n    connection: "
                    f"{{address: 127.0.0.1, port: {port}, user: root}}\n")
    proc = gpunode("check", "--site", str(site), "-k", "test_os or test_sysctls")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    as_json = gpunode("check", "--site", str(site), "-k", "test_os or test_sysctls",
                      "--json", "-")
    doc = json.loads(as_json.stdout)
    drifted = doc["hosts"]["gpu01"]["drifted"]
    assert doc["hosts"]["gpu01"]["status"] == "unreachable" and drifted
    assert "gpu01: unreachable" in proc.stdout
    assert_fits(proc.stdout, drifted[0]["message"])


# ------------------------------------------------------------------------- JSON, --help

def test_lab_status_has_json(tmp_path: Path) -> None:
    proc = gpunode("lab", "status", "--json", "--state-dir", str(tmp_path / "lab"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["vms"] == []


@pytest.mark.parametrize("command", [["validate"], ["sizing"], ["check"], ["lab", "down"],
                                     ["lab", "up"], ["render"]])
def test_help_labels_match_the_option_types(command: list[str]) -> None:
    text = gpunode(*command, "--help").stdout
    assert "<bool>" not in text  # flags take no value
    assert "list[" not in text   # a repeatable option takes one value each time
    assert "--help" in text


def test_help_labels_keep_value_types() -> None:
    text = gpunode("lab", "up", "--help").stdout
    forward = next(line for line in text.splitlines() if "--forward" in line)
    memory = next(line for line in text.splitlines() if "--memory" in line)
    assert "<str>" in forward and "<int>" in memory
