"""The proxmoxer client gpunode uses: credentials, TLS, timeouts and error translation.

Credentials, in this order:
- the PVE host node's ``pve.api`` section of the site (url, token_id, token_secret_file,
  verify_tls: true, false or a CA bundle path);
- the environment, with the names community.proxmox uses: ``PROXMOX_HOST``,
  ``PROXMOX_USER``, ``PROXMOX_TOKEN_ID``, ``PROXMOX_TOKEN_SECRET``, ``PROXMOX_PASSWORD``,
  plus ``PROXMOX_CA_PATH`` and ``PROXMOX_VALIDATE_CERTS``. The environment fills what the
  site leaves out; ``PROXMOX_TOKEN_SECRET``, when set, is used instead of the secret file
  (CI runners get secrets from their store, not from a file the site names).

A secret file must not be readable by group or others (mode 0600 or stricter). Secrets
never appear in a message, a log line or a command line: errors name the host, the API
call (method and path) and PVE's message.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gpunode.proxmox.errors import (
    PveApiError,
    PveAuthError,
    PveConnectError,
    PveInputError,
)

#: proxmoxer's own default is 5 s, too short for PVE calls that touch storage.
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_PORT = 8006


@dataclass(frozen=True)
class Credentials:
    host: str                          # host name or address, no scheme
    port: int
    user: str                          # user@realm
    token_name: str | None = None      # the part after '!'
    token_secret: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    verify: bool | str = True          # True, False or a CA bundle path
    timeout_s: float = DEFAULT_TIMEOUT_S
    secret_source: str = ""            # where the secret came from, for messages

    @property
    def token_id(self) -> str | None:
        return f"{self.user}!{self.token_name}" if self.token_name else None

    @property
    def is_root_password(self) -> bool:
        """Raw hostpci needs root@pam with a password ticket (tokens never qualify)."""
        return self.password is not None and self.user == "root@pam"

    @property
    def who(self) -> str:
        return f"token {self.token_id}" if self.token_name else f"user {self.user}"

    def secrets(self) -> list[str]:
        return [s for s in (self.token_secret, self.password) if s]


def _split_url(value: str) -> tuple[str, int]:
    if "://" not in value:
        value = "https://" + value
    parts = urlsplit(value)
    if parts.scheme != "https":
        raise PveInputError(f"{value}: the Proxmox API is reached over https only")
    if not parts.hostname:
        raise PveInputError(f"{value!r} names no host")
    return parts.hostname, parts.port or DEFAULT_PORT


def read_secret_file(path: str | os.PathLike[str], where: str = "") -> str:
    """The first line of a secret file that only its owner can read."""
    p = Path(path).expanduser()
    label = f"{where}: " if where else ""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise PveInputError(f"{label}secret file {p} does not exist (create it with mode "
                            "0600, or set PROXMOX_TOKEN_SECRET)") from None
    except OSError as exc:
        raise PveInputError(f"{label}cannot read secret file {p}: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PveInputError(f"{label}secret file {p} has mode {stat.S_IMODE(st.st_mode):04o}; "
                            f"it must be readable by its owner only: chmod 600 {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PveInputError(f"{label}cannot read secret file {p}: {exc.strerror}") from None
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise PveInputError(f"{label}secret file {p} is empty")
    return secret


def _truthy(value: str) -> bool:
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def resolve_credentials(api: Any | None, env: Mapping[str, str] | None = None,
                        where: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> Credentials:
    """Credentials from a ``PveApi`` (or None) and the environment.

    Raises PveInputError naming what is missing; nothing is contacted."""
    env = os.environ if env is None else env
    url = getattr(api, "url", None) or env.get("PROXMOX_HOST", "")
    if not url:
        raise PveInputError(f"{where}: no Proxmox API address: set pve.api.url on the PVE "
                            "host node or PROXMOX_HOST")
    host, port = _split_url(url)

    verify: bool | str = getattr(api, "verify_tls", True) if api is not None else True
    if env.get("PROXMOX_CA_PATH"):
        verify = env["PROXMOX_CA_PATH"]
    if "PROXMOX_VALIDATE_CERTS" in env and not _truthy(env["PROXMOX_VALIDATE_CERTS"]):
        verify = False
    if isinstance(verify, str):
        ca = Path(verify).expanduser()
        if not ca.is_file():
            raise PveInputError(f"{where}: CA bundle {ca} (verify_tls / PROXMOX_CA_PATH) is "
                                "not a file")
        verify = str(ca)

    token_id = getattr(api, "token_id", None)
    if not token_id and env.get("PROXMOX_TOKEN_ID"):
        tid = env["PROXMOX_TOKEN_ID"]
        if "!" in tid:
            token_id = tid
        elif env.get("PROXMOX_USER"):
            token_id = f"{env['PROXMOX_USER']}!{tid}"
        else:
            raise PveInputError(f"{where}: PROXMOX_TOKEN_ID={tid} needs PROXMOX_USER "
                                "(user@realm), or give it as user@realm!tokenid")
    if token_id:
        if not re.fullmatch(r"[^@\s!]+@[^!\s]+![\w\-]+", token_id):
            raise PveInputError(f"{where}: token id {token_id!r} is not user@realm!tokenid")
        user, name = token_id.split("!", 1)
        if env.get("PROXMOX_TOKEN_SECRET"):
            secret, source = env["PROXMOX_TOKEN_SECRET"].strip(), "PROXMOX_TOKEN_SECRET"
        elif getattr(api, "token_secret_file", None):
            secret = read_secret_file(api.token_secret_file, where)
            source = f"token_secret_file {Path(api.token_secret_file).expanduser()}"
        else:
            raise PveInputError(f"{where}: no secret for token {token_id}: set "
                                "pve.api.token_secret_file or PROXMOX_TOKEN_SECRET")
        return Credentials(host, port, user, name, token_secret=secret, verify=verify,
                           timeout_s=timeout_s, secret_source=source)
    if env.get("PROXMOX_PASSWORD"):
        user = env.get("PROXMOX_USER", "")
        if "@" not in user:
            raise PveInputError(f"{where}: PROXMOX_PASSWORD needs PROXMOX_USER as user@realm "
                                "(e.g. root@pam)")
        return Credentials(host, port, user, password=env["PROXMOX_PASSWORD"], verify=verify,
                           timeout_s=timeout_s, secret_source="PROXMOX_PASSWORD")
    raise PveInputError(f"{where}: no Proxmox credentials: set pve.api.token_id and "
                        "token_secret_file on the PVE host node, or PROXMOX_USER with "
                        "PROXMOX_TOKEN_ID/PROXMOX_TOKEN_SECRET or PROXMOX_PASSWORD")


def _why(exc: BaseException) -> str:
    """A short reason for a transport error, without URLs or parameters."""
    text = str(exc)
    for needle, why in (("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
                        ("Connection refused", "connection refused"),
                        ("Name or service not known", "host name not found"),
                        ("nodename nor servname", "host name not found"),
                        ("Temporary failure in name resolution", "host name not found"),
                        ("No route to host", "no route to host"),
                        ("Network is unreachable", "network unreachable"),
                        ("timed out", "timed out"), ("Read timed out", "timed out")):
        if needle in text:
            return why
    return type(exc).__name__


class Pve:
    """One PVE API endpoint. ``get/post/put/delete(path, **params)`` return PVE's ``data``
    and raise the exceptions of ``gpunode.proxmox.errors``."""

    def __init__(self, creds: Credentials, api: Any | None = None):
        self.creds = creds
        self.host = creds.host
        self.base = f"https://{creds.host}:{creds.port}"
        self._api = api if api is not None else self._connect()

    def _connect(self) -> Any:
        import requests
        from proxmoxer import ProxmoxAPI
        from proxmoxer.core import AuthenticationError

        c = self.creds
        kw: dict[str, Any] = {"port": c.port, "verify_ssl": c.verify, "timeout": c.timeout_s}
        try:
            if c.token_name:
                return ProxmoxAPI(c.host, user=c.user, token_name=c.token_name,
                                  token_value=c.token_secret, **kw)
            return ProxmoxAPI(c.host, user=c.user, password=c.password, **kw)
        except AuthenticationError:
            raise PveAuthError(f"{self.base}: authentication failed for {c.who}: wrong "
                               f"password or the user is disabled (check {c.secret_source})"
                               ) from None
        except requests.exceptions.RequestException as exc:
            raise self._transport_error("POST /access/ticket", exc) from None

    def _transport_error(self, call: str, exc: BaseException) -> PveConnectError:
        why = _why(exc)
        hint = ""
        if why.startswith("TLS"):
            hint = ("; give the CA that signed the PVE certificate with pve.api.verify_tls: "
                    "/path/to/ca.pem or PROXMOX_CA_PATH")
        return PveConnectError(f"cannot reach the Proxmox API at {self.base} ({call}): "
                               f"{why}{hint}")

    def call(self, method: str, path: str, **params: Any) -> Any:
        import requests
        from proxmoxer.core import ResourceException

        path = path.strip("/")
        label = f"{method.upper()} /{path}"
        params = {k: _wire(v) for k, v in params.items() if v is not None}
        resource = self._api(path)
        try:
            if method == "get":
                return resource.get(**params)
            if method == "delete":
                return resource.delete(**params)
            return getattr(resource, method)(**params)
        except ResourceException as exc:
            status = int(exc.status_code)
            message = str(exc.content or exc.status_message).strip()
            errors = exc.errors if isinstance(exc.errors, dict) else None
            if status == 401:
                raise PveAuthError(
                    f"{self.base}: authentication failed (HTTP 401) for {self.creds.who} on "
                    f"{label}: PVE rejected the credentials -- the secret is wrong, or the "
                    "token was deleted, has expired or its user is disabled (check "
                    f"{self.creds.secret_source})") from None
            if status == 403:
                raise PveAuthError(f"{self.base}: {label}: permission denied for "
                                   f"{self.creds.who}: {message}") from None
            raise PveApiError(f"{self.base} {label}", status, message, errors) from None
        except requests.exceptions.RequestException as exc:
            raise self._transport_error(label, exc) from None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("get", path, **params)

    def post(self, path: str, **params: Any) -> Any:
        return self.call("post", path, **params)

    def put(self, path: str, **params: Any) -> Any:
        return self.call("put", path, **params)

    def delete(self, path: str, **params: Any) -> Any:
        return self.call("delete", path, **params)


def _wire(value: Any) -> Any:
    """PVE takes booleans as 1/0 only (requests would send 'True')."""
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, list | tuple):
        return [_wire(v) for v in value]
    return value


def connect(creds: Credentials) -> Pve:
    return Pve(creds)
