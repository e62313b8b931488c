"""vllm.hf_token_file: a Hugging Face token for gated models, handled like the API key --
a root-only credential file on the node, handed to the prefetch and server units by
LoadCredential= and exported as HF_TOKEN only inside their processes; never in a rendered
file, a command line, the Ansible facts or the manifest. Both engines read
gpunode.core.files.credentials."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from gpunode import facts
from gpunode.checks import expect
from gpunode.cli.deploy import preflight
from gpunode.core import hostcmd, manifest
from gpunode.core.files import credentials, node_files
from gpunode.core.paths import HF_TOKEN_PATH, credential_path
from gpunode.core.render import render
from gpunode.core.topology import Gpu
from gpunode.engines.ansible import plan as ansible_plan
from gpunode.inventory import SiteError, load_site

REPO = Path(__file__).resolve().parents[2]
BARE = yaml.safe_load((REPO / "inventory" / "examples" / "bare-metal.yaml").read_text())
TOKEN = "hf_gpunodeTestTokenXyZ0123456789"
LOAD = "LoadCredential=hf-token:/etc/vllm/credentials/hf-token"
UNITS = ("vllm/vllm@.service.j2", "vllm/vllm-prefetch@.service.j2")
SCRIPTS = ("vllm/vllm-start.j2", "vllm/vllm-prefetch.j2")


def site(tmp_path: Path, token_file: str | None) -> Path:
    data = copy.deepcopy(BARE)
    if token_file is not None:
        data["nodes"]["gpu01"]["vllm"]["hf_token_file"] = token_file
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "hf.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def with_token(tmp_path: Path, token_file: Path):
    return load_site(site(tmp_path, str(token_file))).nodes["gpu01"]


@pytest.fixture
def without_token(tmp_path: Path):
    return load_site(site(tmp_path, None)).nodes["gpu01"]


def _gpus(n: int = 2) -> list[Gpu]:
    return [Gpu(index=i, uuid=f"GPU-{i}", name="NVIDIA RTX A6000", bus_id=f"00000000:0{i}:00.0",
                memory_mib=49140, driver_version="580.95.05", cpus=[i], numa_node=0)
            for i in range(n)]


@pytest.mark.parametrize("bad", ["$(touch /tmp/x)", "a;b", "tok\nen", "`id`", "a|b"])
def test_hostile_token_path_is_refused(tmp_path, bad):
    with pytest.raises(SiteError) as info:
        load_site(site(tmp_path, bad))
    hits = [ln for ln in info.value.lines if " nodes.gpu01.vllm.hf_token_file:" in ln]
    assert hits and ("must be a file path" in hits[0] or "control characters" in hits[0]), \
        info.value.lines


def test_token_in_extra_env_points_at_the_field(tmp_path):
    data = copy.deepcopy(BARE)
    data["nodes"]["gpu01"]["vllm"]["services"][0]["extra_env"] = {"HF_TOKEN": "hf_x"}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SiteError) as info:
        load_site(path)
    assert any("vllm.hf_token_file" in ln for ln in info.value.lines), info.value.lines


def test_units_load_the_credential_and_scripts_export_it(with_token):
    for unit in UNITS:
        text = render(unit, with_token)
        assert f"\n{LOAD}\n" in text, unit
        settings = [ln for ln in text.splitlines() if not ln.startswith("#")]
        assert not [ln for ln in settings if "HF_TOKEN" in ln], unit  # no Environment=
    for script in SCRIPTS:
        text = render(script, with_token)
        assert 'HF_TOKEN=$(cat "$CREDENTIALS_DIRECTORY/hf-token")' in text, script
        assert "export HF_TOKEN" in text


def test_no_token_changes_nothing(without_token):
    assert not [c for c in credentials(without_token) if c.path == HF_TOKEN_PATH]
    for f in node_files(without_token, _gpus()):
        assert "hf-token" not in f.content and "HF_TOKEN" not in f.content, f.path
    assert HF_TOKEN_PATH not in facts.managed_paths(without_token)
    assert HF_TOKEN_PATH not in json.dumps(ansible_plan.desired(without_token)["vllm"]
                                           ["credentials"])


def test_token_never_in_rendered_files_commands_facts_or_manifest(with_token, token_file):
    for f in node_files(with_token, _gpus()):
        assert TOKEN not in f.content, f.path
    env = next(f for f in node_files(with_token) if f.path.endswith(".env"))
    assert "HF_TOKEN" not in env.content
    assert TOKEN not in hostcmd.venv_command(with_token) + hostcmd.user_command(with_token)
    want = ansible_plan.desired(with_token)
    assert TOKEN not in json.dumps(want)
    assert {"path": HF_TOKEN_PATH, "source": str(token_file.resolve())} in \
        want["vllm"]["credentials"]
    assert TOKEN not in json.dumps(ansible_plan.observed(with_token, _snapshot({})))
    assert TOKEN not in json.dumps(expect.vllm_spec(with_token))
    assert HF_TOKEN_PATH in facts.managed_paths(with_token)  # the snapshot stats it
    assert HF_TOKEN_PATH not in manifest.file_paths(with_token)  # no hash of a secret


def test_both_engines_install_the_same_credentials(with_token, token_file):
    [token] = [c for c in credentials(with_token) if c.path == HF_TOKEN_PATH]
    assert token.source == str(token_file)
    assert [c.path for c in credentials(with_token)] == [
        *(credential_path(s.name) for s in with_token.vllm.services if s.api_key_file),
        HF_TOKEN_PATH]
    assert [c["path"] for c in ansible_plan.desired(with_token)["vllm"]["credentials"]] == \
        [c.path for c in credentials(with_token)]
    for unit in ansible_plan.desired(with_token)["vllm"]["units"]:
        assert HF_TOKEN_PATH in unit["inputs"]  # a new token restarts the services


def _snapshot(files: dict) -> dict:
    return {"os": {"id": "debian", "version_id": "12"}, "kernel": "6.1.0-30-amd64",
            "kernels": ["6.1.0-30-amd64"], "cmdline": "", "virt": "none", "cpufreq": False,
            "governors": [], "secure_boot": False, "efi": True, "boot": ["grub"],
            "modules": [], "reboot_required": False, "reboot_required_pkgs": [],
            "nvidia_proc_version": None, "packages": {}, "holds": [], "apt_lists_mtime": 0,
            "files": files, "units": {}, "sysctl": {}, "thp": {}, "hugepages": {},
            "memory_kib": 3000000, "nvidia_smi": {"present": False}, "venvs": {},
            "users": ["root"], "globs": {}, "cmds": {}}


def test_ansible_judges_the_token_file_by_content_mode_and_owner(with_token):
    digest = hashlib.sha256((TOKEN + "\n").encode()).hexdigest()
    right = {"mode": "0600", "owner": "root", "group": "root", "sha256": digest}
    ok = ansible_plan.observed(with_token, _snapshot({HF_TOKEN_PATH: right}))["files_ok"]
    assert ok[HF_TOKEN_PATH]
    for change in ({"mode": "0644"}, {"owner": "vllm"}, {"sha256": "0" * 64}):
        seen = ansible_plan.observed(with_token, _snapshot({HF_TOKEN_PATH: right | change}))
        assert not seen["files_ok"][HF_TOKEN_PATH], change


def test_the_role_installs_every_credential_without_logging(with_token):
    tasks = yaml.safe_load((REPO / "roles/gpunode_vllm/tasks/main.yml").read_text())
    [task] = [t for t in tasks if "gpunode_desired.vllm.credentials" in str(t.get("loop"))]
    assert task["no_log"] is True
    assert task["ansible.builtin.copy"]["mode"] == "0600"
    assert task["ansible.builtin.copy"]["dest"] == "{{ item.path }}"
    assert "item.source" in task["ansible.builtin.copy"]["content"]


def test_preflight_reports_a_missing_token_file(tmp_path):
    s = load_site(site(tmp_path, str(tmp_path / "absent.token")))
    problems = preflight(s, ["gpu01"])
    assert any("nodes.gpu01.vllm.hf_token_file" in p for p in problems), problems


def _run_script(tmp_path: Path, p, template: str, args: list[str], creds: bool) -> dict:
    """Run a rendered start/prefetch script with a stand-in program that records its
    environment and arguments."""
    script = tmp_path / "script"
    script.write_text(render(template, p))
    record = tmp_path / "record.json"
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True, exist_ok=True)
    prog = ("#!/usr/bin/env python3\nimport json, os, sys\n"
            f"json.dump({{'argv': sys.argv, 'token': os.environ.get('HF_TOKEN')}}, "
            f"open({str(record)!r}, 'w'))\n")
    for name in ("vllm", "hf"):
        (fake / name).write_text(prog)
        (fake / name).chmod(0o755)
    env = {"PATH": os.environ["PATH"]}
    if creds:
        cdir = tmp_path / "creds"
        cdir.mkdir(exist_ok=True)
        (cdir / "hf-token").write_text(TOKEN)
        env["CREDENTIALS_DIRECTORY"] = str(cdir)
    subprocess.run(["sh", str(script), *args], env=env, check=True, timeout=30)
    return json.loads(record.read_text())


@pytest.mark.parametrize("template", SCRIPTS)
def test_scripts_hand_the_token_to_the_process_only(tmp_path, with_token, template):
    config = tmp_path / "svc.yaml"
    config.write_text("model: org/gated\nrevision: " + "a" * 40 + "\n")
    if template.endswith("vllm-start.j2"):
        args = [str(tmp_path / "venv" / "bin" / "vllm"), str(config)]
    else:
        args = [str(tmp_path / "venv"), str(config)]
    seen = _run_script(tmp_path, with_token, template, args, creds=True)
    assert seen["token"] == TOKEN
    assert not any(TOKEN in a for a in seen["argv"])
    assert _run_script(tmp_path, with_token, template, args, creds=False)["token"] is None
