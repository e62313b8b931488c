"""pvesim's HTTPS server and the `PveSim` handle tests use (SIMULATION, lab test equipment).

The server answers `/api2/json/...` as Proxmox VE does (envelope, status, reason phrase =
the message's first line) on 127.0.0.1 only, with a certificate from a CA written to
`<lab dir>/pvesim/ca.pem`. `/pvesim/...` is pvesim's own control surface (fault injection,
image import, VM endpoints), guarded by a secret in `<lab dir>/pvesim/control-secret`;
it is not part of the PVE API.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gpunode.lab.pvesim import tls
from gpunode.lab.pvesim.api import Api, Auth, _WithTotal
from gpunode.lab.pvesim.messages import msg
from gpunode.lab.pvesim.state import Fault, PveError, Sim, Volume

HOST = "127.0.0.1"
STATE_FILE = "pvesim.json"


def data_dir(lab_dir: str | Path) -> Path:
    return Path(lab_dir).absolute() / "pvesim"


def _secret_file(path: Path, nbytes: int = 18) -> str:
    """Read a secret file, creating it (0600) first when absent."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(nbytes) + "\n")
    return path.read_text().strip()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: Sim, api: Api, control_secret: str,
                 auth_fail_delay: float) -> None:
        super().__init__(addr, _Handler)
        self.sim, self.api = sim, api
        self.control_secret = control_secret
        self.auth_fail_delay = auth_fail_delay


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "pve-api-daemon/3.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        # Never log query strings or headers (tickets, tokens); method, path and status only.
        sys.stderr.write(f"{self.log_date_time_string()} {self.command} "
                         f"{self.path.split('?')[0]} {args[1] if len(args) > 1 else ''}\n")

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    # ---- plumbing -----------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        url = urllib.parse.urlsplit(self.path)
        pairs = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if body and ctype == "application/json":
            data = json.loads(body or b"{}")
            out: dict[str, Any] = {}
            for k, v in data.items():
                if isinstance(v, bool):
                    v = int(v)
                out[k] = [str(x) for x in v] if isinstance(v, list) else str(v)
            for k, v in pairs:
                out.setdefault(k, v)
            return out
        if body:
            pairs += urllib.parse.parse_qsl(body.decode(), keep_blank_values=True)
        params: dict[str, Any] = {}
        for k, v in pairs:
            if k in params:
                params[k] = (params[k] if isinstance(params[k], list) else [params[k]]) + [v]
            else:
                params[k] = v
        return params

    def _send(self, status: int, reason: str, body: dict[str, Any] | None) -> None:
        reason = (reason.split("\n")[0].replace("\r", "") or "error")[:512]
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "max-age=0")
        self.end_headers()
        self.wfile.write(data)

    def _auth(self) -> Auth | None:
        """pve-http-server: the cookie first, then a ticket in Authorization, then a token."""
        sim = self.server.sim
        hdr = self.headers.get("Authorization") or ""
        ticket = None
        for part in (self.headers.get("Cookie") or "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "PVEAuthCookie" and v:
                ticket = urllib.parse.unquote(v)
        if ticket is None and hdr.startswith("PVEAuthCookie="):
            ticket = hdr[len("PVEAuthCookie="):]
        if ticket is None and hdr.startswith("PVEAPIToken"):
            user = sim.check_token(hdr[len("PVEAPIToken"):].lstrip(" =").strip())
            if user is None:
                raise PveError(401, msg("auth_failed"))
            return Auth(user, False)
        if ticket is None:
            return None
        user = sim.check_ticket(ticket)
        if user is None:
            raise PveError(401, msg("auth_failed"))
        if self.command != "GET":
            csrf = self.headers.get("CSRFPreventionToken") or ""
            if not sim.check_csrf(user, csrf):
                raise PveError(401, msg("csrf"))
        return Auth(user, True)

    def _dispatch(self) -> None:
        sim = self.server.sim
        path = urllib.parse.urlsplit(self.path).path
        try:
            params = self._params()
        except (ValueError, UnicodeDecodeError):
            self._send(400, msg("sim_bad_body"), {"data": None})
            return
        if path.startswith("/pvesim/"):
            self._control(path, params)
            return
        if not path.startswith("/api2/json/"):
            self._send(501, msg("sim_bad_path", path=path), {"data": None})
            return
        api_path = "/" + path[len("/api2/json/"):].strip("/")
        slow = sim.take_fault(("slow",), self.command, api_path)
        if slow:
            time.sleep(slow.seconds)
        fault = sim.take_fault(("http-error",), self.command, api_path)
        try:
            if fault:
                raise PveError(fault.status, msg("sim_fault", detail=fault.message))
            try:
                auth = self._auth()
            except PveError:
                time.sleep(self.server.auth_fail_delay)
                raise
            data = self.server.api.handle(self.command, api_path, params, auth)
        except PveError as exc:
            message = exc.message if exc.message.endswith("\n") else exc.message + "\n"
            if exc.status == 401:
                self._send(401, exc.message, None)
                return
            body: dict[str, Any] = {"data": None, "message": message}
            if exc.errors:
                body["errors"] = exc.errors
            self._send(exc.status, exc.message, body)
            return
        except Exception as exc:  # a pvesim bug: answer like PVE's die, say it is pvesim's
            traceback.print_exc()
            self._send(500, msg("sim_internal", detail=exc), {"data": None})
            return
        body = {"data": data}
        if isinstance(data, _WithTotal):
            body["total"] = data.total
        self._send(200, "OK", body)

    # ---- pvesim's own control surface -----------------------------------------------------
    def _control(self, path: str, p: dict[str, Any]) -> None:
        sim = self.server.sim
        secret = (self.headers.get("Authorization") or "").removeprefix("PVESimControl=")
        if not secrets.compare_digest(secret, self.server.control_secret):
            self._send(401, msg("sim_control_auth"), None)
            return
        try:
            result: Any = None
            if path == "/pvesim/faults" and self.command == "POST":
                f = Fault(kind=p["kind"], method=p.get("method"), path=p.get("path"),
                          status=int(p.get("status", 500)),
                          message=p.get("message", "simulated failure"),
                          seconds=float(p.get("seconds", 0)), times=int(p.get("times", 1)))
                with sim.lock:
                    sim.faults.append(f)
            elif path == "/pvesim/faults" and self.command == "DELETE":
                with sim.lock:
                    sim.faults.clear()
            elif path == "/pvesim/import-image" and self.command == "POST":
                result = self._import_image(Path(p["path"]), p["name"], p.get("storage",
                                                                               "local"))
            elif path == "/pvesim/resources-lag" and self.command == "POST":
                sim.resources_lag_s = float(p["seconds"])
            elif path == "/pvesim/vms" and self.command == "GET":
                b = sim.backend
                result = {str(v.vmid): (b.endpoint(v) if b is not None else None)
                          for v in sim.vms.values()}
            elif path == "/pvesim/state" and self.command == "GET":
                result = {"version": sim.version, "node": sim.node,
                          "vms": sorted(sim.vms), "tasks": len(sim.tasks)}
            else:
                self._send(404, msg("sim_control_unknown"), {"data": None})
                return
        except (KeyError, ValueError, OSError) as exc:
            self._send(400, msg("sim_control_bad", detail=exc), {"data": None})
            return
        self._send(200, "OK", {"data": result})

    def _import_image(self, src: Path, name: str, storage: str) -> str:
        sim = self.server.sim
        if not name.endswith((".qcow2", ".raw", ".vmdk")) or "/" in name:
            raise ValueError("name must be a file name ending in .qcow2, .raw or .vmdk")
        if not src.is_file():
            raise ValueError(f"{src} is not a file")
        st = sim.storages[storage]
        dest = st.path / "import" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        dest.symlink_to(src.absolute())
        volid = f"{storage}:import/{name}"
        with sim.lock:
            sim.volumes[volid] = Volume(volid, "import", src.stat().st_size,
                                        name.rsplit(".", 1)[1], dest)
        return volid


# ---- the server process -------------------------------------------------------------------
@dataclass
class Endpoint:
    """What a running pvesim publishes in `<lab dir>/pvesim/pvesim.json`."""

    url: str
    host: str
    port: int
    pid: int
    version: str
    node: str
    ca: str
    vms: bool


AUTH_FAIL_DELAY_S = 3.0  # pve-http-server AnyEvent.pm: "always delay unauthorized calls by 3 s"


def build(lab_dir: Path, version: str = "9", gpus: int = 2, port: int = 0,
          vms: bool = False, auth_fail_delay: float = AUTH_FAIL_DELAY_S, tie_vms: bool = True
          ) -> tuple[_Server, Sim]:
    """Make the server (bound to 127.0.0.1) and its state; serve with `serve_forever`."""
    d = data_dir(lab_dir)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca, crt, key = tls.ensure_certs(d)
    sim = Sim(d, version=version, gpus=gpus,
              root_password=_secret_file(d / "root-password"))
    sim.ssl_fingerprint = tls.fingerprint(crt)  # type: ignore[attr-defined]
    if vms:
        from gpunode.lab.pvesim.backend import LabBackend

        sim.backend = LabBackend(Path(lab_dir), tie_to_parent=tie_vms)

        def volume_path(volid: str) -> Path | None:
            vol = sim.volumes.get(volid)
            return vol.path if vol is not None and vol.path and vol.path.exists() else None

        sim.backend.volume_path = volume_path
    sim.record()
    srv = _Server((HOST, port), sim, Api(sim), _secret_file(d / "control-secret", 24),
                  auth_fail_delay)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    return srv, sim


def _publish(lab_dir: Path, srv: _Server, sim: Sim) -> Endpoint:
    d = data_dir(lab_dir)
    port = srv.server_address[1]
    ep = Endpoint(url=f"https://{HOST}:{port}/api2/json", host=HOST, port=port,
                  pid=os.getpid(), version=sim.version, node=sim.node,
                  ca=str(d / "ca.pem"), vms=sim.backend is not None)
    tmp = d / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(ep), indent=2) + "\n")
    tmp.replace(d / STATE_FILE)
    return ep


def serve(lab_dir: Path, version: str, gpus: int, port: int, vms: bool,
          tie_to_parent: bool, auth_fail_delay: float = AUTH_FAIL_DELAY_S) -> None:
    """Run pvesim in this process until SIGTERM/SIGINT (`python -m gpunode.lab.pvesim`)."""
    if tie_to_parent:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    srv, sim = build(lab_dir, version, gpus, port, vms, auth_fail_delay)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _publish(lab_dir, srv, sim)
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        if sim.backend is not None:
            sim.backend.stop_all()
        (data_dir(lab_dir) / STATE_FILE).unlink(missing_ok=True)


def read_endpoint(lab_dir: str | Path) -> Endpoint | None:
    """The running pvesim of this lab directory, or None (stale files are removed)."""
    f = data_dir(lab_dir) / STATE_FILE
    try:
        ep = Endpoint(**json.loads(f.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not _is_pvesim(ep.pid):
        f.unlink(missing_ok=True)
        return None
    return ep


def _is_pvesim(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    return b"gpunode.lab.pvesim" in argv


def spawn(lab_dir: Path, version: str = "9", gpus: int = 2, port: int = 0, vms: bool = False,
          tie_to_parent: bool = True, timeout: float = 30.0,
          auth_fail_delay: float = AUTH_FAIL_DELAY_S
          ) -> tuple[Endpoint, subprocess.Popen[bytes]]:
    """Start pvesim as its own process and wait until it listens."""
    d = data_dir(lab_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / STATE_FILE).unlink(missing_ok=True)
    argv = [sys.executable, "-m", "gpunode.lab.pvesim", "serve", "--lab-dir", str(lab_dir),
            "--version", version, "--gpus", str(gpus), "--port", str(port),
            "--auth-fail-delay", str(auth_fail_delay)]
    if vms:
        argv.append("--vms")
    if tie_to_parent:
        argv.append("--tie-to-parent")
    log = (d / "pvesim.log").open("ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=not tie_to_parent)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ep = read_endpoint(lab_dir)
        if ep is not None and ep.pid == proc.pid:
            return ep, proc
        if proc.poll() is not None:
            tail = (d / "pvesim.log").read_text(errors="replace").splitlines()[-10:]
            raise RuntimeError("pvesim exited at start:\n" + "\n".join(tail))
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"pvesim did not start listening within {timeout:.0f} s "
                       f"(log: {d / 'pvesim.log'})")


def terminate(lab_dir: str | Path, timeout: float = 60.0) -> bool:
    """Stop the lab's pvesim process (SIGTERM; it stops its VMs). False if none ran."""
    ep = read_endpoint(lab_dir)
    if ep is None:
        return False
    os.kill(ep.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _is_pvesim(ep.pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(ep.pid, os.WNOHANG)
        time.sleep(0.2)
    if _is_pvesim(ep.pid):
        os.kill(ep.pid, signal.SIGKILL)
    (data_dir(lab_dir) / STATE_FILE).unlink(missing_ok=True)
    return True


# ---- the handle tests use -------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    full_id: str  # user@realm!tokenid
    secret: str

    @property
    def user(self) -> str:
        return self.full_id.split("!")[0]

    @property
    def name(self) -> str:
        return self.full_id.split("!")[1]


class PveSim:
    """A running pvesim for one lab directory (context manager).

    `in_process=True` serves from a thread of this process (fast unit tests); otherwise
    pvesim runs as its own process, tied to this one (`tie_to_parent=False`: it outlives
    this process, and its VMs with it, until `stop()` or `terminate(lab_dir)`). `vms=True`
    backs VMs with lab VMs.
    """

    def __init__(self, lab_dir: str | Path, version: str = "9", *, vms: bool = False,
                 gpus: int = 2, in_process: bool = False, port: int = 0,
                 auth_fail_delay: float = AUTH_FAIL_DELAY_S, tie_to_parent: bool = True
                 ) -> None:
        self.lab_dir = Path(lab_dir).absolute()
        self.version = version
        self.vms = vms
        self.gpus = gpus
        self.in_process = in_process
        self._port = port
        self.auth_fail_delay = auth_fail_delay
        self.tie_to_parent = tie_to_parent
        self._srv: _Server | None = None
        self.sim: Sim | None = None  # in-process only; tests must not use it to drive pvesim
        self._proc: subprocess.Popen[bytes] | None = None
        self._ep: Endpoint | None = None

    # lifecycle
    def start(self) -> PveSim:
        if self.in_process:
            self._srv, self.sim = build(self.lab_dir, self.version, self.gpus, self._port,
                                        self.vms, self.auth_fail_delay)
            threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.1},
                             daemon=True, name="pvesim").start()
            self._ep = _publish(self.lab_dir, self._srv, self.sim)
        else:
            self._ep, self._proc = spawn(self.lab_dir, self.version, self.gpus, self._port,
                                         self.vms, tie_to_parent=self.tie_to_parent,
                                         auth_fail_delay=self.auth_fail_delay)
        return self

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            if self.sim is not None and self.sim.backend is not None:
                self.sim.backend.stop_all()
            (data_dir(self.lab_dir) / STATE_FILE).unlink(missing_ok=True)
            self._srv = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> PveSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # where it is
    @property
    def endpoint(self) -> Endpoint:
        if self._ep is None:
            raise RuntimeError("pvesim is not started")
        return self._ep

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int:
        return self.endpoint.port

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def node(self) -> str:
        return self.endpoint.node

    @property
    def ca_path(self) -> Path:
        return Path(self.endpoint.ca)

    @property
    def root_password(self) -> str:
        return (data_dir(self.lab_dir) / "root-password").read_text().strip()

    # clients
    def api(self, token: Token | None = None, timeout: float = 30) -> Any:
        """A proxmoxer ProxmoxAPI: root@pam with a password ticket, or the given token."""
        from proxmoxer import ProxmoxAPI

        common = {"port": self.port, "verify_ssl": str(self.ca_path), "timeout": timeout}
        if token is None:
            return ProxmoxAPI(self.host, user="root@pam", password=self.root_password,
                              **common)
        return ProxmoxAPI(self.host, user=token.user, token_name=token.name,
                          token_value=token.secret, **common)

    def create_token(self, userid: str, tokenid: str, *, privsep: bool = True,
                     acl: list[tuple[str, str]] = (), propagate: bool = True) -> Token:  # type: ignore[assignment]
        """Create the user (if new) and an API token through the PVE API as root@pam, and
        grant `acl` [(path, role)] to the user and (privilege-separated) to the token."""
        root = self.api()
        from proxmoxer.core import ResourceException

        try:
            root.access.users.post(userid=userid)
        except ResourceException as exc:
            if "already exists" not in str(exc):
                raise
        res = root.access.users(userid).token(tokenid).post(privsep=int(privsep))
        for path, role in acl:
            root.access.acl.put(path=path, roles=role, users=userid,
                                propagate=int(propagate))
            if privsep:
                root.access.acl.put(path=path, roles=role, tokens=res["full-tokenid"],
                                    propagate=int(propagate))
        return Token(res["full-tokenid"], res["value"])

    # pvesim's own controls (test equipment, not the PVE API)
    def _control(self, method: str, path: str, data: dict[str, Any] | None = None) -> Any:
        import requests

        secret = (data_dir(self.lab_dir) / "control-secret").read_text().strip()
        r = requests.request(method, f"https://{self.host}:{self.port}/pvesim/{path}",
                             data=data, verify=str(self.ca_path), timeout=30,
                             headers={"Authorization": f"PVESimControl={secret}"})
        if r.status_code != 200:
            raise RuntimeError(f"pvesim control {method} {path}: {r.status_code} {r.reason}")
        return r.json()["data"]

    def fault(self, kind: str, *, path: str | None = None, method: str | None = None,
              status: int = 500, message: str = "simulated failure", seconds: float = 0.0,
              times: int = 1) -> None:
        """Inject a fault. kinds: http-error (status+message on matching requests),
        slow (sleep `seconds` before answering), task-fail / task-hang / task-warn (the next
        task started by a request whose path contains `path`), lag (/cluster/resources lags
        `seconds`), expire-tickets (every ticket is refused), node-gone (running tasks fail
        and requests to the node answer 595). `times=0`: until `clear_faults()`."""
        data = {"kind": kind, "status": status, "message": message, "seconds": seconds,
                "times": times}
        if path:
            data["path"] = path
        if method:
            data["method"] = method
        self._control("POST", "faults", data)

    def clear_faults(self) -> None:
        self._control("DELETE", "faults")

    def import_image(self, path: str | Path, name: str, storage: str = "local") -> str:
        """Place a local disk image as `<storage>:import/<name>` (like copying it into
        /var/lib/vz/import by SSH on a real node). Returns the volume id."""
        return str(self._control("POST", "import-image", {"path": str(path), "name": name,
                                                           "storage": storage}))

    def ssh_endpoint(self, vmid: int) -> tuple[str, int] | None:
        """Where the lab forwards the guest's SSH: ("127.0.0.1", port), None if not booted."""
        ep = self._control("GET", "vms").get(str(vmid))
        return (ep["host"], int(ep["ssh_port"])) if ep else None
