"""Credentials, TLS options and error translation of the proxmoxer client."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest
import requests
from requests.adapters import BaseAdapter

from gpunode.proxmox.client import Credentials, Pve, read_secret_file, resolve_credentials
from gpunode.proxmox.errors import PveApiError, PveAuthError, PveConnectError, PveInputError

SECRET = "5f1e0c9a-7b2d-4e3f-9a8b-c1d2e3f4a5b6"


def api(**kw):
    base = {"url": "https://pve1.example:8006", "token_id": "gpunode@pve!provision",
            "token_secret_file": None, "verify_tls": True}
    return SimpleNamespace(**(base | kw))


def secret_file(tmp_path, mode=0o600, text=SECRET + "\n"):
    path = tmp_path / "pve.token"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_token_from_site_and_0600_file(tmp_path):
    c = resolve_credentials(api(token_secret_file=str(secret_file(tmp_path))), env={})
    assert (c.host, c.port, c.user, c.token_name, c.token_secret) == \
        ("pve1.example", 8006, "gpunode@pve", "provision", SECRET)
    assert c.timeout_s > 5
    assert SECRET not in repr(c)


def test_secret_file_readable_by_others_is_refused(tmp_path):
    path = secret_file(tmp_path, mode=0o644)
    with pytest.raises(PveInputError, match="chmod 600") as exc:
        read_secret_file(path)
    assert SECRET not in str(exc.value)


def test_missing_secret_file_says_what_to_do(tmp_path):
    with pytest.raises(PveInputError, match="PROXMOX_TOKEN_SECRET"):
        resolve_credentials(api(token_secret_file=str(tmp_path / "none")), env={})


def test_environment_names_of_community_proxmox():
    env = {"PROXMOX_HOST": "10.1.2.3", "PROXMOX_USER": "ci@pve", "PROXMOX_TOKEN_ID": "runner",
           "PROXMOX_TOKEN_SECRET": SECRET}
    c = resolve_credentials(None, env=env)
    assert (c.host, c.port, c.token_id, c.token_secret) == ("10.1.2.3", 8006, "ci@pve!runner",
                                                            SECRET)
    assert c.secret_source == "PROXMOX_TOKEN_SECRET"


def test_env_secret_overrides_the_file_for_ci(tmp_path):
    c = resolve_credentials(api(token_secret_file=str(tmp_path / "absent")),
                            env={"PROXMOX_TOKEN_SECRET": "other"})
    assert c.token_secret == "other"


def test_password_login_from_environment():
    c = resolve_credentials(None, env={"PROXMOX_HOST": "pve1:8443", "PROXMOX_USER": "root@pam",
                                       "PROXMOX_PASSWORD": "hunter2"})
    assert (c.port, c.password, c.token_name, c.is_root_password) == (8443, "hunter2", None,
                                                                     True)
    assert "hunter2" not in repr(c)


def test_no_credentials_is_input_error():
    with pytest.raises(PveInputError, match="no Proxmox credentials"):
        resolve_credentials(None, env={"PROXMOX_HOST": "pve1"})
    with pytest.raises(PveInputError, match="no Proxmox API address"):
        resolve_credentials(None, env={})


def test_ca_path_must_exist_and_is_used(tmp_path):
    with pytest.raises(PveInputError, match="CA bundle"):
        resolve_credentials(api(verify_tls=str(tmp_path / "ca.pem")),
                            env={"PROXMOX_TOKEN_SECRET": SECRET})
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    c = resolve_credentials(None, env={"PROXMOX_HOST": "h", "PROXMOX_TOKEN_ID": "u@pve!t",
                                       "PROXMOX_TOKEN_SECRET": SECRET,
                                       "PROXMOX_CA_PATH": str(ca)})
    assert c.verify == str(ca)


# --- error translation through the real proxmoxer ---------------------------------------

class Canned(BaseAdapter):
    """Answers every request with one status, PVE reason phrase and body."""

    def __init__(self, status: int, reason: str, body: dict):
        super().__init__()
        self.status, self.reason, self.body = status, reason, body
        self.requests: list[requests.PreparedRequest] = []

    def send(self, request, **kwargs):
        self.requests.append(request)
        r = requests.Response()
        r.status_code, r.reason, r.request, r.url = self.status, self.reason, request, request.url
        r._content = json.dumps(self.body).encode()
        r.headers["Content-Type"] = "application/json;charset=UTF-8"
        return r

    def close(self):
        pass


def creds(**kw) -> Credentials:
    return Credentials(**({"host": "pve1.example", "port": 8006, "user": "gpunode@pve",
                           "token_name": "provision", "token_secret": SECRET,
                           "secret_source": "PROXMOX_TOKEN_SECRET"} | kw))


def mounted(adapter: Canned) -> Pve:
    pve = Pve(creds())
    pve._api._store["session"].mount("https://pve1.example:8006/", adapter)
    return pve


def test_401_is_explained_without_the_secret():
    adapter = Canned(401, "authentication failure", {"data": None})
    with pytest.raises(PveAuthError) as exc:
        mounted(adapter).get("version")
    text = str(exc.value)
    assert "401" in text and "gpunode@pve!provision" in text and "PROXMOX_TOKEN_SECRET" in text
    assert SECRET not in text
    # the token went in the header, as PVE wants it
    assert adapter.requests[0].headers["Authorization"] == \
        f"PVEAPIToken=gpunode@pve!provision={SECRET}"


def test_500_carries_pves_message_and_the_call():
    msg = "unable to create VM 201 - VM 201 already exists on node 'pve1'"
    with pytest.raises(PveApiError) as exc:
        mounted(Canned(500, msg, {"data": None, "message": msg + "\n"})).post(
            "nodes/pve1/qemu", vmid=201, numa=True)
    assert exc.value.status == 500 and exc.value.pve_message == msg
    assert "POST /nodes/pve1/qemu" in str(exc.value)


def test_booleans_go_out_as_1_and_0():
    adapter = Canned(200, "OK", {"data": None})
    mounted(adapter).post("nodes/pve1/qemu/201/config", numa=True, agent=False)
    assert adapter.requests[0].body in ("numa=1&agent=0", "agent=0&numa=1")


def test_400_lists_the_parameter_errors():
    body = {"data": None, "errors": {"sshkeys": "invalid urlencoded string"}}
    with pytest.raises(PveApiError, match="sshkeys: invalid urlencoded string"):
        mounted(Canned(400, "Parameter verification failed.", body)).post("x", sshkeys="a b")


def test_unreachable_host_names_the_host():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pve = Pve(creds(host="127.0.0.1", port=port, timeout_s=5))
    with pytest.raises(PveConnectError) as exc:
        pve.get("version")
    assert f"https://127.0.0.1:{port}" in str(exc.value)
    assert "connection refused" in str(exc.value)
    assert SECRET not in str(exc.value)
