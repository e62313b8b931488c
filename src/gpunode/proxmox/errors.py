"""What can go wrong talking to Proxmox VE, as exceptions whose text a user can act on.

No message ever carries a secret: they are built from the host, the API call (method and
path, never parameters) and PVE's own words."""

from __future__ import annotations


class PveError(Exception):
    """Base: something failed on or on the way to a PVE host."""


class PveInputError(PveError):
    """Invalid input found before anything was touched (missing credentials, a raw
    hostpci address with a token, a VM id that belongs to another VM...)."""


class PveConnectError(PveError):
    """The API could not be reached (DNS, refused, TLS, timeout)."""


class PveAuthError(PveError):
    """PVE refused the credentials (HTTP 401) or the permission check failed (403)."""


class PveApiError(PveError):
    """A synchronous API error: HTTP status, PVE's message and per-parameter errors."""

    def __init__(self, call: str, status: int, message: str,
                 errors: dict[str, str] | None = None):
        self.call = call
        self.status = status
        self.pve_message = message
        self.errors = errors or {}
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(self.errors.items()))
        text = f"{call}: HTTP {status}: {message}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)


class TaskFailed(PveError):
    """A PVE task ended with an exit status other than OK / WARNINGS: n."""

    def __init__(self, what: str, upid: str, exitstatus: str, log_tail: list[str]):
        self.what = what
        self.upid = upid
        self.exitstatus = exitstatus
        self.log_tail = log_tail
        super().__init__(f"{what} failed: {exitstatus} (task {upid})")


class TaskTimeout(PveError):
    """A PVE task was still running when gpunode stopped waiting."""

    def __init__(self, what: str, upid: str, waited_s: float):
        self.what = what
        self.upid = upid
        self.waited_s = waited_s
        super().__init__(f"{what}: task {upid} still running after {waited_s:.0f} s; "
                         "gpunode stopped waiting (the task may still finish on the PVE "
                         "host: look at it in the task log there)")


class AgentTimeout(PveError):
    """The guest agent never reported an address."""
