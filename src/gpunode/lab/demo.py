"""`make demo`: the mission in one command, from a Proxmox host with GPUs to a served,
streamed chat completion, on this machine (the hardware and the NVIDIA stack SIMULATED).

1. lab: the lab's base image (the "cloud image") and the simulated NVIDIA mirrors;
2. pvesim: a SIMULATION of the Proxmox VE 9 API, node `pve1` with two simulated RTX
   A6000s, the image imported, an API token for provisioning;
3. provision: the PCI mappings and GPU VM 201 created through proxmoxer as against a real
   Proxmox (`gpunode provision`, or `ansible-playbook playbooks/provision.yml`), booted
   with cloud-init (a lab VM behind pvesim);
4. guest: SSH and cloud-init done, the GPUs pvesim gave the guest from its hostpci devices
   seen, the model files copied in (as to an air-gapped host);
5. deploy: the full stack, by pyinfra (`gpunode deploy`) or Ansible
   (`playbooks/gpu_node.yml`): the lab's simulated NVIDIA driver, CUDA, NCCL, DCGM,
   container toolkit, tuning, and one vLLM stand-in service on both GPUs;
6. check: `gpunode check` (testinfra);
7. chat: one chat completion with `stream: true` through an SSH tunnel to the served
   endpoint, read as server-sent events, as a user's client would;
8. destroy + teardown: the VM removed through the same engine, pvesim and the mirrors
   stopped (`--keep` leaves everything running instead).

A progress view shows the step, its elapsed time and what it is doing now; each command's
whole output is in `<state>/logs/`. Secrets (the vLLM API key, the PVE token secret) stay
in 0600 files: never on a command line or in the output, which the demo checks at the end.
A failed step ends the demo with one message naming it, exit 1, after the teardown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from gpunode.cli import output

REPO = Path(__file__).resolve().parents[3]
NODE = "pvegpu1"
VMID = 201
#: The GPU VM's memory: the PVE config asks for it and the lab VM behind pvesim gets it
#: (PVESIM_MAX_MEMORY_MIB; pvesim's default cap is 2048).
MEMORY_MIB = 3072
TINY_MODEL = "/var/lib/vllm/models/tiny-sim"
TOKEN_USER, TOKEN_NAME = "demo@pve", "provision"
ENGINES = ("pyinfra", "ansible")
HEARTBEAT_S = 30.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class StepFailed(Exception):
    """A step went wrong: the message says what, the step's log holds the whole output."""


@dataclass
class Step:
    key: str
    title: str
    state: str = "pending"  # pending | running | ok | failed | skipped
    started: float = 0.0
    seconds: float = 0.0
    detail: str = ""
    commands: list[str] = field(default_factory=list)
    log: Path | None = None


# ---- the progress view ---------------------------------------------------------------------

class Progress:
    """Where the demo is at every moment. On a terminal: a live table of the steps (state,
    seconds) and the current step's latest activity. Elsewhere (a pipe, a CI log): a line
    when a step starts and ends, and a "still in" line every 30 s with its latest
    activity."""

    def __init__(self, console: Console, steps: list[Step]):
        self.console = console
        self.steps = steps
        self.activity = ""
        self.current: Step | None = None
        self._stop = threading.Event()
        self._live: Live | None = None
        self._ticker: threading.Thread | None = None
        self._said = 0.0  # when the last line was printed

    def __enter__(self) -> Progress:
        if self.console.is_terminal:
            self._live = Live(console=self.console, get_renderable=self.render,
                              refresh_per_second=4, transient=True)
            self._live.start()
        else:
            self._ticker = threading.Thread(target=self._heartbeat, daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._live is not None:
            self._live.stop()
        if self._ticker is not None:
            self._ticker.join(timeout=1)

    def render(self) -> Group:
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(width=2)
        table.add_column()
        table.add_column(justify="right")
        table.add_column(overflow="ellipsis", no_wrap=True)
        marks = {"pending": Text("·", "dim"), "ok": Text("✓", "green"),
                 "failed": Text("✗", "red"), "skipped": Text("-", "dim")}
        for s in self.steps:
            mark = Spinner("dots") if s.state == "running" else marks[s.state]
            secs = time.monotonic() - s.started if s.state == "running" else s.seconds
            table.add_row(mark, Text(s.title, "bold" if s.state == "running" else ""),
                          "" if s.state == "pending" else f"{secs:.0f} s",
                          Text(s.detail, "dim"))
        now = Text(f"  now: {self.activity}" if self.current and self.activity else "",
                   "cyan", overflow="ellipsis", no_wrap=True)
        return Group(table, now)

    def _heartbeat(self) -> None:
        """A "still in" line when nothing was said for HEARTBEAT_S."""
        while not self._stop.wait(min(1.0, HEARTBEAT_S / 4)):
            s = self.current
            if s is not None and time.monotonic() - self._said >= HEARTBEAT_S:
                self.say(f"  … still in {s.key} ({time.monotonic() - s.started:.0f} s)"
                         + (f": {self.activity}" if self.activity else ""))

    def say(self, line: str) -> None:
        """A line above the view (on a terminal) or in the log stream (elsewhere)."""
        self._said = time.monotonic()
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def note(self, activity: str) -> None:
        self.activity = activity[:300]

    @contextlib.contextmanager
    def step(self, s: Step) -> Iterator[Step]:
        s.state, s.started, self.current, self.activity = "running", time.monotonic(), s, ""
        if self._live is None:
            self.say(f"{time.strftime('%H:%M:%S')} ▶ {s.title}")
        try:
            yield s
        except BaseException:
            s.state = "failed"
            raise
        else:
            s.state = "ok"
        finally:
            s.seconds = time.monotonic() - s.started
            self.current = None
            mark = "✓" if s.state == "ok" else "✗"
            self.say(f"{time.strftime('%H:%M:%S')} {mark} {s.title} ({s.seconds:.1f} s)"
                     + (f": {s.detail}" if s.detail else ""))


# ---- commands ------------------------------------------------------------------------------

def shown(argv: list[str]) -> str:
    """A command as a user would type it (the venv's tools by name, paths relative to the
    checkout)."""
    bin_dir = str(Path(sys.executable).parent) + "/"
    out = []
    for a in argv:
        a = a.removeprefix(bin_dir)
        with contextlib.suppress(ValueError):
            a = str(Path(a).relative_to(REPO)) if a.startswith("/") else a
        out.append(shlex.quote(a))
    return " ".join(out)


class Runner:
    """Runs each step's commands with their output in a log file and the latest relevant
    line in the progress view; refuses a command line that carries a secret."""

    def __init__(self, progress: Progress, logs: Path, env: dict[str, str],
                 secrets: list[str]):
        self.progress = progress
        self.logs = logs
        self.env = env
        self.secrets = secrets
        self.count = 0

    def __call__(self, step: Step, argv: list[str], activity: str | None = None,
                 timeout: float = 3600) -> tuple[int, str]:
        if any(s and s in a for s in self.secrets for a in argv):
            raise StepFailed("refusing to put a secret on a command line")
        self.count += 1
        step.log = self.logs / f"{self.count:02d}-{step.key}.log"
        step.commands.append(shown(argv))
        pattern = re.compile(activity) if activity else None
        deadline = time.monotonic() + timeout
        with step.log.open("w") as log, subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                errors="replace") as proc:
            assert proc.stdout is not None
            log.write(f"$ {shown(argv)}\n")
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    text = ANSI.sub("", line).strip().rstrip("*").rstrip()  # Ansible's rules
                    if text and (pattern is None or pattern.search(text)):
                        self.progress.note(text)
                    if time.monotonic() > deadline:
                        raise StepFailed(f"{shown(argv[:2])} did not finish within "
                                         f"{timeout:.0f} s")
            except BaseException:  # a timeout, Ctrl-C, kill: the command ends with the demo
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            rc = proc.wait()
        return rc, step.log.read_text(errors="replace")


def tail(text: str, lines: int = 12) -> str:
    return "\n".join("    " + ANSI.sub("", x) for x in text.rstrip().splitlines()[-lines:])


def free_ssh_port() -> int:
    """A free port for the GPU VM's SSH forward, from the top of the lab's SSH range (lab
    VMs take the lowest free ports, so another lab started meanwhile does not take it)."""
    from gpunode.lab.core import SSH_PORT_BASE, SSH_PORT_LAST, port_free

    for port in range(SSH_PORT_LAST, SSH_PORT_BASE, -1):
        if port_free(port):
            return port
    raise StepFailed(f"no free port on 127.0.0.1 in {SSH_PORT_BASE}-{SSH_PORT_LAST} for "
                     "the VM's SSH")


def write_secret(path: Path, value: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")


# ---- the streamed chat completion ----------------------------------------------------------

@dataclass
class Chat:
    model: str
    text: str
    chunks: int
    first_token_s: float
    seconds: float
    finish_reason: str | None


@contextlib.contextmanager
def ssh_tunnel(host: str, port: int, user: str, key: Path, remote_port: int
               ) -> Iterator[int]:
    """`ssh -N -L` from a free local port to the guest's 127.0.0.1:`remote_port` (vLLM is
    bound to the guest's loopback), as a user reaches it from a workstation."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    argv = ["ssh", "-F", "/dev/null", "-N", "-p", str(port), "-i", str(key),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-L", f"127.0.0.1:{local}:127.0.0.1:{remote_port}",
            f"{user}@{host}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise StepFailed(f"ssh -L to {user}@{host}:{port} ended: "
                                 f"{(proc.stderr.read() if proc.stderr else '').strip()}")
            with socket.socket() as c:
                c.settimeout(1)
                if c.connect_ex(("127.0.0.1", local)) == 0:
                    break
            if time.monotonic() > deadline:
                raise StepFailed(f"the SSH tunnel to {host}:{port} did not open in 30 s")
            time.sleep(0.2)
        yield local
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def stream_chat(url: str, key: str, model: str, on_text: Callable[[str], None]) -> Chat:
    """POST /v1/chat/completions with `stream: true`; read the server-sent events
    (`data: {chunk}` ... `data: [DONE]`) as an OpenAI client does."""
    import requests

    body = {"model": model, "stream": True, "max_tokens": 32,
            "messages": [{"role": "user", "content": "Say hello to gpunode."}]}
    started = time.monotonic()
    first: float | None = None
    text, chunks, finish, done, seen_model = "", 0, None, False, ""
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {key}",
                                "Accept": "text/event-stream"}) as r:
        if r.status_code != 200:
            raise StepFailed(f"POST {url}/v1/chat/completions: HTTP {r.status_code} "
                             f"{r.text[:200]}")
        ctype = r.headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            raise StepFailed(f"the answer is not a stream (content-type {ctype!r})")
        for raw in r.iter_lines(decode_unicode=True):
            if not raw or not raw.startswith("data:"):
                continue
            data = raw[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            chunks += 1
            seen_model = chunk.get("model", seen_model)
            choice = chunk["choices"][0]
            piece = choice.get("delta", {}).get("content") or ""
            if piece:
                if first is None:
                    first = time.monotonic() - started
                text += piece
                on_text(text)
            finish = choice.get("finish_reason") or finish
    if not done:
        raise StepFailed("the event stream ended without `data: [DONE]`")
    if not text:
        raise StepFailed("the stream carried no content")
    return Chat(seen_model, text, chunks, first or 0.0, time.monotonic() - started, finish)


# ---- the demo --------------------------------------------------------------------------------

class Demo:
    def __init__(self, engine: str, state: Path, keep: bool, console: Console):
        self.engine = engine
        self.state = state.absolute()
        self.keep = keep
        self.console = console
        self.site = self.state / "site.yaml"
        self.logs = self.state / "logs"
        self.token_file = self.state / "pve.token"
        self.check_json = self.state / "check.json"
        self.secrets: list[str] = []
        self.pve: Any = None
        self.provisioned = False
        self.checks: dict[str, Any] | None = None
        self.chat: Chat | None = None
        self.failure: tuple[Step, str] | None = None
        ap = "ansible-playbook"
        self.steps = [
            Step("lab", "Lab image and simulated NVIDIA mirrors"),
            Step("pvesim", "pvesim: simulated PVE 9 node with 2 RTX A6000s"),
            Step("provision", "PCI mappings + GPU VM through proxmoxer"
                 + (f" ({ap} provision.yml)" if engine == "ansible" else "")),
            Step("guest", "Guest: SSH, cloud-init, GPUs, model files"),
            Step("deploy", f"Deploy the full stack ({engine})"),
            Step("check", "gpunode check"),
            Step("chat", "One streamed chat completion"),
            Step("destroy", "Destroy the VM" + (f" ({ap})" if engine == "ansible" else "")),
            Step("teardown", "Stop pvesim and the mirrors"),
        ]
        self.by_key = {s.key: s for s in self.steps}

    # -- helpers --
    def tool(self, name: str) -> str:
        return str(Path(sys.executable).with_name(name))

    def env(self) -> dict[str, str]:
        from gpunode.cli.deploy import ansible_env

        env = {k: v for k, v in ansible_env(self.site).items() if not k.startswith("PROXMOX_")}
        return env | {"ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "COLUMNS": "160",
                      "PYTHONUNBUFFERED": "1"}

    def gpunode(self, *args: str) -> list[str]:
        return [self.tool("gpunode"), *args, "--site", str(self.site)]

    def playbook(self, name: str, *extra: str) -> list[str]:
        return [self.tool("ansible-playbook"), f"playbooks/{name}", "--limit", NODE, *extra]

    def require(self, rc: int, text: str, what: str) -> None:
        if rc != 0:
            raise StepFailed(f"{what} exited {rc}; last lines:\n{tail(text)}")

    # -- steps --
    def clean_leftovers(self) -> None:
        """What an earlier demo in this state directory left (a --keep run, a kill)."""
        from gpunode.lab.core import Lab
        from gpunode.lab.pvesim import server
        from gpunode.lab.sim import server as mirrors

        server.terminate(self.state)
        lab = Lab(self.state)
        for name in lab.names():
            with contextlib.suppress(Exception):
                lab.destroy(name)
        with contextlib.suppress(Exception):
            mirrors.stop(self.state)
        for path in (self.state / "pvesim", self.state / ".gpunode", self.logs):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.token_file, self.check_json, self.site):
            path.unlink(missing_ok=True)
        self.logs.mkdir(parents=True)

    def lab(self, s: Step) -> None:
        from gpunode.lab import image, labsite

        self.progress.note("base image (built once, then cached)")
        self.image = image.ensure_image()
        self.progress.note("simulated NVIDIA repositories and Python index")
        self.facts = labsite.prepare_lab(self.state)
        s.detail = f"mirrors at {self.facts['pypi_index_url'].split('/pypi')[0]} (guest view)"

    def pvesim(self, s: Step) -> None:
        from gpunode.lab import labsite
        from gpunode.lab.core import Lab
        from gpunode.lab.pvesim.server import PveSim

        port = free_ssh_port()
        os.environ["PVESIM_SSH_PORTS"] = f"{VMID}={port}"
        os.environ["PVESIM_MAX_MEMORY_MIB"] = str(MEMORY_MIB)
        self.progress.note("starting pvesim (lab-backed VMs)")
        self.pve = PveSim(self.state, version="9", vms=True, gpus=2,
                          tie_to_parent=not self.keep).start()
        self.progress.note("importing the lab image as local:import/" + labsite.LAB_IMAGE)
        self.pve.import_image(self.image, labsite.LAB_IMAGE)
        tok = self.pve.create_token(TOKEN_USER, TOKEN_NAME, privsep=True,
                                    acl=labsite.PROVISION_TOKEN_ACL)
        self.secrets.append(tok.secret)
        write_secret(self.token_file, tok.secret)
        lab = Lab(self.state)
        doc = labsite.lab_site(lab, self.facts)
        doc["nodes"] = labsite.pvesim_nodes(lab, self.pve, tok.full_id, self.token_file,
                                            node=NODE, vmid=VMID, memory_mib=MEMORY_MIB,
                                            ssh_port=port)
        import yaml

        self.site.write_text("# Written by `make demo`: pvesim (SIMULATED Proxmox VE) and a GPU "
                             "VM on it; SIMULATED NVIDIA mirrors on 10.0.2.2.\n"
                             + yaml.safe_dump(doc, sort_keys=False))
        for svc in doc["groups"]["lab"]["vllm"]["services"]:
            self.secrets.append(Path(svc["api_key_file"]).read_text().strip())
        gpus = [d for d in self.pve.api().nodes(self.pve.node).hardware.pci.get()
                if d.get("vendor") == "0x10de" and str(d.get("class", "")).startswith("0x03")]
        s.detail = (f"PVE {self.pve.endpoint.version} at {self.pve.host}:{self.pve.port}, node "
                    f"{self.pve.node}: {len(gpus)}x {gpus[0]['device_name'] if gpus else '?'} "
                    f"({', '.join(d['id'] for d in gpus)}); token {tok.full_id}")

    def provision(self, s: Step) -> None:
        self.provisioned = True
        if self.engine == "pyinfra":
            rc, text = self.run(s, self.gpunode("provision", NODE),
                                activity=r"\d\d:\d\d:\d\d |provision")
        else:
            rc, text = self.run(s, self.playbook("provision.yml"), activity=r"^(TASK|ok:|changed:)")
        self.require(rc, text, "provisioning")
        api = self.pve.api()
        maps = sorted(m["id"] for m in api.cluster.mapping.pci.get())
        conf = api.nodes(self.pve.node).qemu(VMID).config.get()
        status = api.nodes(self.pve.node).qemu(VMID).status.current.get()["status"]
        pci = [conf[k].split(",")[0].removeprefix("mapping=")
               for k in sorted(conf) if k.startswith("hostpci")]
        s.detail = (f"mappings {', '.join(maps)}; VM {VMID} {status}, "
                    f"hostpci {', '.join(pci)}, {conf.get('machine', '')} "
                    f"{conf.get('bios', '')}")

    def guest(self, s: Step) -> None:
        from gpunode.cli.check import key_path
        from gpunode.inventory import load_site
        from gpunode.lab import labsite
        from gpunode.lab.core import Lab
        from gpunode.lab.pvesim.backend import lab_name
        from gpunode.proxmox.ready import NotReady, wait_ready

        profile = load_site(self.site).nodes[NODE]
        try:
            waited = wait_ready(profile, key_path(profile, self.site),
                                profile.vm.agent_timeout_s if profile.vm else 900,
                                self.progress.note)
        except NotReady as exc:
            raise StepFailed(str(exc)) from None
        vm = Lab(self.state).wait_ssh(lab_name(VMID), timeout=300)
        self.progress.note("waiting for the simulated GPUs pvesim writes from hostpci")
        deadline = time.monotonic() + 180
        while True:
            rc, out, _ = vm.run(f"cat {labsite.GUEST_GPUS}", timeout=30)
            if rc == 0 and out.strip():
                gpus = json.loads(out)["gpus"]
                break
            if time.monotonic() > deadline:
                raise StepFailed(f"pvesim did not give the guest its GPUs "
                                 f"({labsite.GUEST_GPUS} missing after 180 s)")
            time.sleep(2)
        self.progress.note(f"copying the model files to {TINY_MODEL}")
        labsite.prepare_guest(vm, models=(TINY_MODEL,), write_gpus=False)
        s.detail = (f"ready after {waited:.0f} s; GPUs "
                    + ", ".join(f"{g['model']['name']} {g['pci_bus_id'][4:].lower()}"
                                for g in gpus))

    def deploy(self, s: Step) -> None:
        if self.engine == "pyinfra":
            rc, text = self.run(s, self.gpunode("deploy", NODE), activity=r"^-> ")
            m = re.search(rf"{NODE}\W+(\d+)\W+(\d+)\W+ok", text)
            s.detail = f"{m.group(1)} operations changed, {m.group(2)} unchanged" if m else ""
        else:
            rc, text = self.run(s, self.playbook("gpu_node.yml"), activity=r"^TASK ")
            m = re.search(rf"{NODE}\s*:\s*ok=(\d+)\s+changed=(\d+)", text)
            s.detail = f"{m.group(1)} tasks ok, {m.group(2)} changed" if m else ""
        self.require(rc, text, "the deploy")

    def check(self, s: Step) -> None:
        rc, text = self.run(s, self.gpunode("check", NODE) + ["--json", str(self.check_json)])
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.checks = json.loads(self.check_json.read_text())["hosts"][NODE]
        if self.checks is None:
            self.require(rc or 1, text, "gpunode check")
        c = self.checks["counts"]
        s.detail = (f"{c['passed']} passed, {c['failed'] + c['error']} failed, "
                    f"{c['skipped']} skipped")
        if rc != 0:
            bad = "; ".join(f"{d['concern']}::{d['check']}" for d in self.checks["drifted"][:5])
            raise StepFailed(f"gpunode check found problems ({s.detail}): {bad}")

    def chat_step(self, s: Step) -> None:
        from gpunode.cli.check import key_path
        from gpunode.inventory import load_site

        profile = load_site(self.site).nodes[NODE]
        svc = profile.vllm.services[0]
        key = Path(svc.api_key_file).expanduser().read_text().strip()
        c = profile.connection
        with ssh_tunnel(c.address, c.port, c.user, key_path(profile, self.site) or Path(),
                        svc.port) as local:
            url = f"http://127.0.0.1:{local}"
            s.commands.append(f"ssh -N -L {local}:127.0.0.1:{svc.port} {c.user}@{c.address} "
                              f"-p {c.port}; POST {url}/v1/chat/completions (stream: true)")
            self.chat = stream_chat(url, key, svc.names[0],
                                    lambda text: self.progress.note(f"streaming: {text}"))
        s.detail = (f"{self.chat.chunks} chunks, first token after "
                    f"{self.chat.first_token_s * 1000:.0f} ms")

    def destroy(self, s: Step) -> None:
        if self.engine == "pyinfra":
            rc, text = self.run(s, self.gpunode("destroy", NODE))
        else:
            rc, text = self.run(s, self.playbook("provision.yml", "-e",
                                                 "gpunode_vm_state=absent"))
        self.require(rc, text, "destroying the VM")
        left = [int(v["vmid"]) for v in self.pve.api().nodes(self.pve.node).qemu.get()]
        if VMID in left:
            raise StepFailed(f"VM {VMID} still exists on {self.pve.node} after the destroy")
        s.detail = f"VM {VMID} removed (purge)"

    def teardown(self, s: Step) -> None:
        from gpunode.lab.core import Lab
        from gpunode.lab.sim import server as mirrors

        if self.pve is not None:
            self.pve.stop()
        from gpunode.lab.pvesim import server

        server.terminate(self.state)
        stopped = Lab(self.state).down_all()
        mirrors.stop(self.state)
        s.detail = "pvesim, mirrors" + (f", VMs {', '.join(stopped)}" if stopped else "")

    # -- the run --
    def execute(self) -> int:
        started = time.monotonic()
        self.clean_leftovers()
        self.progress = Progress(self.console, self.steps)
        self.run = Runner(self.progress, self.logs, self.env(), self.secrets)
        order = ["lab", "pvesim", "provision", "guest", "deploy", "check", "chat"]
        funcs: dict[str, Callable[[Step], None]] = {
            "lab": self.lab, "pvesim": self.pvesim, "provision": self.provision,
            "guest": self.guest, "deploy": self.deploy, "check": self.check,
            "chat": self.chat_step, "destroy": self.destroy, "teardown": self.teardown}
        with self.progress:
            try:
                for key in order:
                    self.run_step(key, funcs[key])
            except _Stop:
                pass
            except KeyboardInterrupt:
                cur = next((x for x in self.steps if x.state == "failed"), self.steps[0])
                cur.detail = "interrupted"
                self.failure = (cur, "interrupted")
            if self.keep:
                for key in ("destroy", "teardown"):
                    self.by_key[key].state = "skipped"
            else:
                if self.provisioned and self.pve is not None:
                    self.run_step("destroy", funcs["destroy"], teardown=True)
                else:
                    self.by_key["destroy"].state = "skipped"
                self.run_step("teardown", funcs["teardown"], teardown=True)
        leaked = self.leaked()
        self.summary(time.monotonic() - started, leaked)
        return 0 if self.failure is None and not leaked else 1

    def run_step(self, key: str, fn: Callable[[Step], None], teardown: bool = False) -> None:
        """Run one step; a failure is recorded (the first one is the demo's) and ends the
        chain (`_Stop`), except in the teardown, which goes on."""
        s = self.by_key[key]
        try:
            with self.progress.step(s):
                try:
                    fn(s)
                except Exception as exc:
                    message = (str(exc) if isinstance(exc, StepFailed)
                               else f"{type(exc).__name__}: {exc}")
                    s.detail = message.splitlines()[0][:200]
                    if self.failure is None:
                        self.failure = (s, message)
                    raise
        except Exception:
            if not teardown:
                raise _Stop() from None

    def leaked(self) -> list[str]:
        """Files of this run (logs, pvesim's log, the recorded output) holding a secret."""
        found = []
        files = [*self.logs.glob("*.log"), self.state / "pvesim" / "pvesim.log",
                 self.state / "sim-http.log"]
        texts = {str(p): p.read_text(errors="replace") for p in files if p.is_file()}
        texts["the demo's output"] = self.console.export_text(clear=False)
        for where, text in texts.items():
            if any(sec and sec in text for sec in self.secrets):
                found.append(where)
        return found

    def summary(self, total: float, leaked: list[str]) -> None:
        out = self.console
        ok = self.failure is None and not leaked
        minutes, seconds = divmod(round(total), 60)
        out.rule(f"[bold]gpunode demo ({self.engine}): {'ok' if ok else 'FAILED'} in "
                 f"{minutes} min {seconds} s")
        rows = []
        for s in self.steps:
            state = {"ok": "[green]ok[/green]", "failed": "[red]FAILED[/red]",
                     "skipped": "[dim]skipped[/dim]", "pending": "[dim]not run[/dim]",
                     "running": "[red]cut off[/red]"}[s.state]
            secs = f"{s.seconds:.1f}" if s.state in ("ok", "failed") else "-"
            rows.append([s.key, state, secs, s.detail])
        output.print_table(out, "steps", [output.Column("step"), output.Column("state"),
                                          output.Column("s", "right"),
                                          output.Column("detail", wrap=True)], rows)
        if any(s.commands for s in self.steps):
            out.print("commands run:", highlight=False)
        for s in self.steps:
            for cmd in s.commands:
                out.print(f"  {s.key:<9} {cmd}", highlight=False, markup=False, soft_wrap=True)
        if self.checks is not None:
            from gpunode.cli.check import print_table

            print_table(out, {NODE: self.checks})
        if self.chat is not None:
            c = self.chat
            out.print(f"chat (stream): model {c.model}, {c.chunks} chunks, first token "
                      f"{c.first_token_s * 1000:.0f} ms, all {c.seconds * 1000:.0f} ms, "
                      f"finish_reason {c.finish_reason}", highlight=False, markup=False)
            out.print(f"  {c.text!r}", highlight=False, markup=False)
        out.print("Simulated here: the Proxmox VE API (pvesim), the RTX A6000s, the NVIDIA "
                  "packages and tools, and vLLM (a stand-in that serves no model).",
                  highlight=False, markup=False)
        if self.keep and self.pve is not None:
            rel = shown([str(self.state)])
            out.print(f"Left running (--keep): pvesim at {self.pve.url}; the VM: "
                      f"gpunode lab ssh {'pve-' + str(VMID)} --state-dir {rel}; its site: "
                      f"{rel}/site.yaml. Tear down: gpunode destroy {NODE} --site "
                      f"{rel}/site.yaml; gpunode lab pvesim down --state-dir {rel}; "
                      f"gpunode lab down --all --state-dir {rel}", highlight=False,
                      markup=False, soft_wrap=True)
        out.print(f"logs: {shown([str(self.logs)])}/", highlight=False, markup=False)
        if leaked:
            out.print(f"[red]a secret appeared in: {', '.join(leaked)}[/red]", highlight=False)
        if self.failure is not None:
            s, message = self.failure
            log = f" (log: {shown([str(s.log)])})" if s.log else ""
            out.print(f"[red]demo failed at step {s.key}[/red] ({s.title}): "
                      f"{Text(message).markup}{log}", highlight=False)


class _Stop(Exception):
    """Ends the chain of steps after a failure (already recorded)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpunode.lab.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=ENGINES, default="pyinfra",
                        help="front end for provisioning and the deploy (default: pyinfra)")
    parser.add_argument("--keep", action="store_true",
                        help="leave pvesim, the VM and the mirrors running")
    parser.add_argument("--state", default=str(REPO / ".lab" / "demo"),
                        help="the demo's lab directory (default: .lab/demo)")
    args = parser.parse_args(argv)
    console = output.console()
    console.record = True
    demo = Demo(args.engine, Path(args.state), args.keep, console)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)  # `kill` tears down like Ctrl-C
    # paramiko logs each refused connection of the wait for SSH (a guest still booting) with
    # a traceback; the wait retries and says what it waits for.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    return demo.execute()


if __name__ == "__main__":
    sys.exit(main())
