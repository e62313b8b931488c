"""Field types that say what a value is. Every string in a site file reaches a root shell,
a unit file, an apt source, a YAML file or the Ansible templater somewhere, so each string
field is validated for its meaning here, once; quoting where values land (shlex, systemd,
YAML) is the second line of defence, not the first.

Each type is an ``Annotated`` alias, so it works the same inside a model, in a
``TypeAdapter`` (the loader type-checks partial layers field by field) and in the JSON
Schema (patterns are published where they say everything)."""

from __future__ import annotations

import ipaddress
import posixpath
import re
from typing import Annotated

from pydantic import AfterValidator, Field, StrictInt

#: Characters that never belong in a site string that reaches a host: control characters
#: (newline, NUL, ...), the Unicode line/paragraph separators and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
#: Jinja delimiters (Ansible would evaluate them on the controller).
_JINJA = re.compile(r"\{\{|\{%|\{#|%\}|\}\}|#\}")

POSIX_NAME = r"^[a-z_][a-z0-9_-]{0,30}$"
PATH_CHARS = r"^/[A-Za-z0-9._@+/-]*$"
HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
URL = re.compile(r"^(?P<scheme>https?)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)"
                 r"(?::(?P<port>\d{1,5}))?(?P<path>/[A-Za-z0-9._~%/+@-]*)?$")
REVISION = r"^[0-9a-f]{40}$"
#: A sysctl value as the kernel takes it: words of [A-Za-z0-9_.:/+-] separated by single
#: spaces or tabs (e.g. "4096 87380 6291456"); no pipes, quotes, newlines.
SYSCTL_VALUE = r"^[A-Za-z0-9_.:/+%-]+([ \t][A-Za-z0-9_.:/+%-]+)*$"
SIZE = r"^[0-9]+[KMGT]?$"
#: A PVE volume id (storage:path), e.g. local:import/debian-12.qcow2.
VOLID = r"^[a-zA-Z][a-zA-Z0-9._-]*:[A-Za-z0-9._/+-]+$"
#: Debian package names and versions (Debian Policy 5.6.1, 5.6.12), as a lock file pins them.
DEB_NAME = r"^[a-z0-9][a-z0-9+.-]{1,127}$"
DEB_VERSION = r"^([0-9]+:)?[0-9][A-Za-z0-9.+~-]{0,127}$"
#: Python distributions as a lock pins them: PEP 503 names, PEP 440 versions, wheel hashes.
PY_NAME = r"^[a-z0-9]([a-z0-9-]{0,126}[a-z0-9])?$"
PY_VERSION = r"^[0-9][A-Za-z0-9.+!_-]{0,63}$"
WHEEL_HASH = r"^sha256:[0-9a-f]{64}$"

#: System directories a service's data must never be, nor live under (the deploy hands the
#: directory to the service user).
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
               "/proc", "/root", "/run", "/sbin", "/sys", "/usr", "/var/lib/apt",
               "/var/lib/dpkg", "/var/lib/systemd", "/var/lib/ucf", "/var/lib/sudo",
               "/var/lib/private", "/var/log", "/var/cache/apt", "/var/spool", "/tmp",
               "/var/tmp", "/var/run", "/var/lock")
#: Where a directory owned by the service user may live (the model cache): below one of
#: these, or one of the dedicated-mount roots itself. Nothing root runs from or reads as
#: configuration is in these trees.
DATA_ROOTS = ("/var/lib/vllm", "/var/cache/vllm", "/srv", "/mnt", "/data", "/models",
              "/scratch", "/raid", "/nvme", "/workspace")
DATA_MOUNTS = ("/data", "/models", "/scratch", "/raid", "/nvme", "/workspace")
#: Where a root-owned install prefix may live: strictly below one of these.
PREFIX_ROOTS = ("/opt", "/srv", "/usr/local", "/var/lib")


def no_control_chars(value: str) -> str:
    """A value quoted where it lands (YAML, environment files): no control characters."""
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (newline, tab, NUL, ...)")
    return value


def no_control(value: str) -> str:
    """Free text that still lands in files: no control characters, no Jinja delimiters."""
    no_control_chars(value)
    if _JINJA.search(value):
        raise ValueError("must not contain Jinja delimiters ({{ }}, {% %}, {# #})")
    return value


def abs_path(value: str) -> str:
    no_control(value)
    if not re.fullmatch(PATH_CHARS, value):
        raise ValueError("must be an absolute path of letters, digits and . _ @ + - / "
                         "(no spaces, quotes or shell characters)")
    parts = value.split("/")
    if any(part in (".", "..") for part in parts):
        raise ValueError("must not contain . or .. components")
    if "//" in value or (value != "/" and value.endswith("/")):
        raise ValueError("must be normalised (no // and no trailing /)")
    return value


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def _system_dir(value: str) -> None:
    for system in SYSTEM_DIRS:
        if _under(value, system) and not _under(value, "/usr/local"):
            raise ValueError(f"{value} is a system directory (or inside one: {system})")


def _data_dir(value: str) -> str:
    """A directory the deploy hands to the service user."""
    abs_path(value)
    _system_dir(value)
    if not (value in DATA_MOUNTS
            or any(_under(value, root) and value != root for root in DATA_ROOTS)):
        raise ValueError(f"must be {', '.join(DATA_MOUNTS)} or a directory below one of "
                         f"{', '.join(DATA_ROOTS)} (the service user owns it, so never a "
                         "place root runs from)")
    return posixpath.normpath(value)


def _prefix_dir(value: str) -> str:
    """A root-owned install directory."""
    abs_path(value)
    _system_dir(value)
    if not any(_under(value, root) and value != root for root in PREFIX_ROOTS):
        raise ValueError(f"must be a directory strictly below one of {', '.join(PREFIX_ROOTS)}")
    return posixpath.normpath(value)


def _control_path(value: str) -> str:
    """A path on the control machine (read there, never sent to a host)."""
    no_control(value)
    if not re.fullmatch(r"^(~/|/|[A-Za-z0-9._])[A-Za-z0-9._@+/ -]*$", value):
        raise ValueError("must be a file path (absolute, ~/..., or relative to the working "
                         "directory) of letters, digits, space and . _ @ + - /")
    return value


def _host(value: str) -> str:
    no_control(value)
    try:
        _ip(value)
        return value
    except ValueError:
        pass
    if not HOSTNAME.fullmatch(value):
        raise ValueError("must be an IP address or a DNS host name (letters, digits, - and .)")
    return value


def _ip(value: str) -> str:
    address, _, scope = value.partition("%")
    if "%" in value and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", scope):
        raise ValueError("an IPv6 scope must be an interface name ([A-Za-z0-9_.-], at most 15)")
    try:
        ipaddress.ip_address(value if not scope else f"{address}%{scope}")
    except ValueError:
        raise ValueError("must be an IPv4 or IPv6 address") from None
    return value


def _url(value: str) -> str:
    no_control(value)
    match = URL.fullmatch(value)
    if not match:
        raise ValueError("must be an http:// or https:// URL: scheme, host, optional port and "
                         "path of URL-safe characters (no spaces, quotes, query or fragment)")
    if match["port"] and not 1 <= int(match["port"]) <= 65535:
        raise ValueError("port must be 1-65535")
    host = match["host"].strip("[]")
    if not match["host"].startswith("["):
        _host(host)
    return value


def _https_url(value: str) -> str:
    _url(value)
    if not value.startswith("https://"):
        raise ValueError("must be an https:// URL")
    return value


def _word(value: str) -> str:
    """One token for a unit file or a command line: [A-Za-z0-9._:@+-]."""
    if not re.fullmatch(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$", value):
        raise ValueError("must be one word of letters, digits and . _ : @ + -")
    return value


#: A POSIX user or group name (useradd's portable set).
PosixName = Annotated[str, Field(pattern=POSIX_NAME, description="POSIX user name.")]
#: Absolute, normalised path on the managed host, shell- and unit-safe characters only.
AbsPath = Annotated[str, AfterValidator(abs_path)]
#: A directory handed to a service user: below an allowed root, never a system directory.
DataDir = Annotated[str, AfterValidator(_data_dir)]
#: A root-owned install prefix.
PrefixDir = Annotated[str, AfterValidator(_prefix_dir)]
#: A path on the control machine (keys, secrets): absolute, ~/ or relative.
ControlPath = Annotated[str, AfterValidator(_control_path)]
#: Host name or IP address.
HostName = Annotated[str, AfterValidator(_host)]
IpAddress = Annotated[str, AfterValidator(_ip)]
#: http(s) URL without whitespace, quotes, query or fragment.
Url = Annotated[str, AfterValidator(_url)]
HttpsUrl = Annotated[str, AfterValidator(_https_url)]
#: A value written quoted (YAML, environment file): any printable text.
Quoted = Annotated[str, Field(max_length=4096), AfterValidator(no_control_chars)]
#: Free text that lands in files (descriptions, names shown to users).
Text = Annotated[str, Field(max_length=1024), AfterValidator(no_control)]
Word = Annotated[str, Field(max_length=128), AfterValidator(_word)]
Revision = Annotated[str, Field(pattern=REVISION)]
DebName = Annotated[str, Field(pattern=DEB_NAME)]
DebVersion = Annotated[str, Field(pattern=DEB_VERSION)]
PyName = Annotated[str, Field(pattern=PY_NAME)]
PyVersion = Annotated[str, Field(pattern=PY_VERSION)]
WheelHash = Annotated[str, Field(pattern=WHEEL_HASH)]
SysctlValue = Annotated[str, Field(pattern=SYSCTL_VALUE, max_length=256)]
#: Integers only (YAML true/false are not 1/0).
Int = StrictInt
#: A TCP port.
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
#: A byte size: an integer, or digits with K, M, G or T (powers of 1024), as systemd reads it.
Size = Annotated[StrictInt, Field(ge=0)] | Annotated[str, Field(pattern=SIZE)]
