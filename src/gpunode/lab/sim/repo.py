"""SIMULATION: build the lab's signed apt repositories from the package catalogue.

Layout under the www root (the lab serves it on 127.0.0.1, guests see http://10.0.2.2:<port>/):

    compute/cuda/repos/<distro>/x86_64/       flat repo like NVIDIA's CUDA repository:
        *.deb  Packages  Packages.gz  Release  Release.gpg  InRelease
        cuda-keyring_1.1-1_all.deb            (also listed in Packages, as NVIDIA's is)
    libnvidia-container/gpgkey                armored public key (like nvidia.github.io)
    libnvidia-container/stable/deb/nvidia-container-toolkit.list
    libnvidia-container/stable/deb/amd64/     flat container toolkit repo
    repo.json                                 manifest for the lab site file

The .debs are written in pure Python (ar + tar.gz, deterministic); metadata and signatures
use the same formats apt reads from NVIDIA. Signing keys are THROWAWAY keys generated into
the lab cache (`~/.cache/gpunode/lab/sim-key/`), never committed and never printed.
A build is skipped when the hash of its inputs (code, catalogue incl. guest tools, keys,
base URL) matches the last build.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpunode.lab.errors import LabError
from gpunode.lab.paths import cache_root
from gpunode.lab.sim import packages as cat

BUILD_FORMAT = "1"
MTIME = 1_700_000_000  # fixed timestamp inside the .debs: identical inputs, identical bytes
STAMP = ".gpunode-sim-repo.json"
MANIFEST = "repo.json"
DEFAULT_PORT = 18087
GUEST_HOST = "10.0.2.2"  # qemu user-net alias of the host's loopback

KEY_UIDS = {
    "cuda": "gpunode lab SIMULATION CUDA repository key (throwaway) <cuda-sim@gpunode.invalid>",
    "ctk": "gpunode lab SIMULATION container toolkit key (throwaway) <ctk-sim@gpunode.invalid>",
}


def default_www_root() -> Path:
    env = os.environ.get("GPUNODE_LAB_WWW")
    return Path(env) if env else cache_root() / "www"


def default_key_dir() -> Path:
    return cache_root() / "sim-key"


def default_port() -> int:
    raw = os.environ.get("GPUNODE_LAB_HTTP_PORT", "")
    if not raw:
        return DEFAULT_PORT
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise LabError(
            f"GPUNODE_LAB_HTTP_PORT={raw!r} is not a TCP port; set it to 1-65535 or unset it "
            f"(default {DEFAULT_PORT})."
        )
    return port


def guest_base_url(port: int | None = None) -> str:
    return f"http://{GUEST_HOST}:{port or default_port()}"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock between lab processes building into the same place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Key:
    fingerprint: str
    keyring: bytes  # binary (gpg --export), what /usr/share/keyrings/*.gpg holds
    armored: bytes  # gpg --armor --export, what nvidia.github.io's gpgkey is


def _gpg(gnupghome: Path, *args: str, input_: bytes | None = None) -> bytes:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPG")}
    env["GNUPGHOME"] = str(gnupghome)
    cmd = ["gpg", "--batch", "--no-tty", "--quiet", "--pinentry-mode", "loopback",
           "--passphrase", "", *args]
    try:
        proc = subprocess.run(cmd, input=input_, capture_output=True, env=env, check=False)
    except FileNotFoundError as exc:
        raise LabError("gpg is not installed; install it with `apt-get install gnupg`.") from exc
    if proc.returncode != 0:
        raise LabError(
            f"gpg {args[0]} failed in {gnupghome}: {proc.stderr.decode(errors='replace').strip()}"
            " — remove that directory to regenerate the throwaway lab keys."
        )
    return proc.stdout


def _stop_agent(gnupghome: Path) -> None:
    env = dict(os.environ, GNUPGHOME=str(gnupghome))
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True,
                   check=False)


def ensure_keys(key_dir: Path | None = None) -> dict[str, Key]:
    """The throwaway signing keys ("cuda", "ctk"), generated on first use."""
    home = (key_dir or default_key_dir()) / "gnupg"
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    keys: dict[str, Key] = {}
    with locked(home.parent / ".lock"):
        return _ensure_keys(home, keys)


def _ensure_keys(home: Path, keys: dict[str, Key]) -> dict[str, Key]:
    try:
        for name, uid in KEY_UIDS.items():
            listing = subprocess.run(
                ["gpg", "--batch", "--with-colons", "--list-secret-keys", uid],
                env=dict(os.environ, GNUPGHOME=str(home)), capture_output=True, check=False,
            ).stdout.decode()
            if "fpr:" not in listing:
                _gpg(home, "--quick-gen-key", uid, "ed25519", "sign", "never")
                listing = _gpg(home, "--with-colons", "--list-secret-keys", uid).decode()
            fpr = next(line.split(":")[9] for line in listing.splitlines()
                       if line.startswith("fpr:"))
            keys[name] = Key(
                fingerprint=fpr,
                keyring=_gpg(home, "--export", fpr),
                armored=_gpg(home, "--armor", "--export", fpr),
            )
    finally:
        _stop_agent(home)
    return keys


# ------------------------------------------------------------------------------- debs


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = link
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = MTIME
    return ti


def _targz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        header = f"{name:<16}{MTIME:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n"
        out += header.encode("ascii") + data
        if len(data) % 2:
            out += b"\n"
    return bytes(out)


def _data_members(pkg: cat.Package) -> tuple[list[tuple[tarfile.TarInfo, bytes | None]], int]:
    dirs: set[str] = set()
    for f in pkg.files:
        parts = f.path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_tarinfo("./", tarfile.DIRTYPE, 0o755), None)
    ]
    members += [(_tarinfo(f"./{d}/", tarfile.DIRTYPE, 0o755), None) for d in sorted(dirs)]
    size_kib = len(dirs) + 1
    for f in sorted(pkg.files, key=lambda f: f.path):
        name = "." + f.path
        if f.link is not None:
            members.append((_tarinfo(name, tarfile.SYMTYPE, 0o777, link=f.link), None))
        else:
            members.append((_tarinfo(name, tarfile.REGTYPE, f.mode, len(f.data)), f.data))
            size_kib += (len(f.data) + 1023) // 1024
    return members, size_kib


def build_deb(pkg: cat.Package) -> tuple[bytes, str]:
    """(the .deb bytes, its control text)."""
    data_members, installed_kib = _data_members(pkg)
    fields = pkg.control_fields()
    fields.insert(4, ("Installed-Size", str(installed_kib)))
    control = "".join(f"{k}: {v}\n" for k, v in fields)
    md5sums = "".join(
        f"{hashlib.md5(f.data).hexdigest()}  {f.path.lstrip('/')}\n"
        for f in sorted(pkg.files, key=lambda f: f.path) if f.link is None
    )
    ctl: list[tuple[str, bytes, int]] = [("control", control.encode(), 0o644),
                                          ("md5sums", md5sums.encode(), 0o644)]
    if pkg.conffiles():
        ctl.append(("conffiles", "".join(p + "\n" for p in pkg.conffiles()).encode(), 0o644))
    if pkg.triggers:
        ctl.append(("triggers", pkg.triggers.encode(), 0o644))
    for script, text in pkg.scripts:
        ctl.append((script, text.encode(), 0o755))
    control_members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_tarinfo("./", tarfile.DIRTYPE, 0o755), None)
    ]
    control_members += [(_tarinfo(f"./{n}", tarfile.REGTYPE, m, len(d)), d) for n, d, m in ctl]
    deb = _ar([
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", _targz(control_members)),
        ("data.tar.gz", _targz(data_members)),
    ])
    return deb, control


def _stanza(control: str, filename: str, deb: bytes) -> str:
    lines = control.rstrip("\n").split("\n")
    desc_at = next(i for i, line in enumerate(lines) if line.startswith("Description:"))
    extra = [
        f"Filename: ./{filename}",
        f"Size: {len(deb)}",
        f"MD5sum: {hashlib.md5(deb).hexdigest()}",
        f"SHA1: {hashlib.sha1(deb).hexdigest()}",
        f"SHA256: {hashlib.sha256(deb).hexdigest()}",
    ]
    return "\n".join(lines[:desc_at] + extra + lines[desc_at:]) + "\n"


def _release(repo: cat.AptRepo, files: dict[str, bytes]) -> str:
    out = [
        f"Origin: {repo.origin}",
        f"Label: {repo.label}",
        f"Architecture: {repo.architecture}",
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S UTC', time.gmtime())}",
    ]
    for field, algo in (("MD5Sum", "md5"), ("SHA1", "sha1"), ("SHA256", "sha256")):
        out.append(f"{field}:")
        for name, data in files.items():
            out.append(f" {hashlib.new(algo, data).hexdigest()} {len(data):>16} {name}")
    return "\n".join(out) + "\n"


def _write_repo(repo: cat.AptRepo, dest: Path, key_dir: Path, key: Key) -> dict[str, str]:
    """Write one flat repo into dest (fresh dir); returns {filename: sha256} of its debs."""
    dest.mkdir(parents=True)
    stanzas = []
    hashes: dict[str, str] = {}
    for pkg in repo.packages:
        deb, control = build_deb(pkg)
        (dest / pkg.filename).write_bytes(deb)
        hashes[pkg.filename] = hashlib.sha256(deb).hexdigest()
        stanzas.append(_stanza(control, pkg.filename, deb))
    packages = "\n".join(stanzas).encode()
    packages_gz = gzip.compress(packages, mtime=0)
    (dest / "Packages").write_bytes(packages)
    (dest / "Packages.gz").write_bytes(packages_gz)
    release = _release(repo, {"Packages": packages, "Packages.gz": packages_gz})
    (dest / "Release").write_text(release)
    home = key_dir / "gnupg"
    try:
        _gpg(home, "--local-user", key.fingerprint, "--digest-algo", "SHA256", "--armor",
             "--detach-sign", "--output", str(dest / "Release.gpg"), str(dest / "Release"))
        _gpg(home, "--local-user", key.fingerprint, "--digest-algo", "SHA256", "--clearsign",
             "--output", str(dest / "InRelease"), str(dest / "Release"))
    finally:
        _stop_agent(home)
    return hashes


# ------------------------------------------------------------------------------ build


def _input_hash(repos: list[cat.AptRepo], keys: dict[str, Key], base_url: str) -> str:
    h = hashlib.sha256()
    h.update(BUILD_FORMAT.encode())
    here = Path(__file__).resolve().parent
    for src in ("repo.py", "packages.py"):
        h.update((here / src).read_bytes())
    h.update(base_url.encode())
    for name in sorted(keys):
        h.update(keys[name].fingerprint.encode())
    h.update(repr(repos).encode())
    return h.hexdigest()


def _versions(repo: cat.AptRepo) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in repo.packages:
        out.setdefault(p.name, []).append(p.version)
    return out


def build(
    www_root: Path | str | None = None,
    *,
    base_url: str | None = None,
    key_dir: Path | str | None = None,
    force: bool = False,
    driver_versions: tuple[str, ...] = cat.DRIVER_VERSIONS,
) -> dict:
    """Build (or reuse) all simulated apt repositories; return the manifest (repo.json).

    base_url is how guests reach the www root (default http://10.0.2.2:<port>); it goes
    into cuda-keyring's sources.list entry and the container toolkit .list file.
    driver_versions: the driver releases the CUDA repositories offer, oldest first (a test
    publishes a newer one, then builds the default set again).
    """
    www = Path(www_root) if www_root else default_www_root()
    kdir = Path(key_dir) if key_dir else default_key_dir()
    base = (base_url or guest_base_url()).rstrip("/")
    keys = ensure_keys(kdir)
    with locked(www / ".repo-build.lock"):
        return _build(www, kdir, base, keys, force, tuple(driver_versions))


def _build(www: Path, kdir: Path, base: str, keys: dict[str, Key], force: bool,
           driver_versions: tuple[str, ...]) -> dict:
    repos = cat.catalogue({"cuda": keys["cuda"].keyring, "ctk": keys["ctk"].keyring}, base,
                          driver_versions)
    digest = _input_hash(repos, keys, base)
    stamp = www / STAMP
    if not force and stamp.is_file():
        try:
            previous = json.loads(stamp.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("input_hash") == digest and (www / MANIFEST).is_file():
            return json.loads((www / MANIFEST).read_text())

    started = time.monotonic()
    www.mkdir(parents=True, exist_ok=True)
    staging = www / ".repo-staging"
    shutil.rmtree(staging, ignore_errors=True)
    manifest: dict = {
        "simulation": True,
        "input_hash": digest,
        "base_url": base,
        "driver_branch": cat.DRIVER_BRANCH,
        "driver_versions": list(driver_versions),
        "cuda": {
            "repo_url": f"{base}/{cat.CUDA_REPO_ROOT}",
            "key_fingerprint": keys["cuda"].fingerprint,
            "keyring_path": cat.CUDA_KEYRING_PATH,
            "distros": {},
        },
    }
    for repo in repos:
        hashes = _write_repo(repo, staging / repo.path, kdir, keys[repo.key])
        if repo.key == "cuda":
            distro = repo.path.split("/")[-2]
            if distro.startswith("ubuntu"):  # the old manual recipe downloads this file
                (staging / repo.path / f"cuda-{distro}.pin").write_text(cat.UBUNTU_PIN)
            keyring = next(p for p in repo.packages if p.name == "cuda-keyring")
            manifest["cuda"]["distros"][distro] = {
                "url": f"{base}/{repo.path}/",
                "keyring_deb": keyring.filename,
                "keyring_url": f"{base}/{repo.path}/{keyring.filename}",
                "keyring_sha256": hashes[keyring.filename],
                "driver_deb_versions": [cat._drv_version(v, distro)
                                        for v in driver_versions],
                "packages": _versions(repo),
            }
        else:
            manifest["container_toolkit"] = {
                "repo_url": f"{base}/{cat.CTK_REPO_ROOT}/stable/deb/$(ARCH)",
                "list_url": f"{base}/{cat.CTK_REPO_ROOT}/stable/deb/nvidia-container-toolkit.list",
                "gpgkey_url": f"{base}/{cat.CTK_REPO_ROOT}/gpgkey",
                "gpgkey_sha256": hashlib.sha256(keys["ctk"].armored).hexdigest(),
                "key_fingerprint": keys["ctk"].fingerprint,
                "keyring_path": cat.CTK_KEYRING_PATH,
                "versions": [f"{v}-1" for v in cat.CTK_VERSIONS],
                "packages": _versions(repo),
            }
    ctk_root = staging / cat.CTK_REPO_ROOT
    (ctk_root / "gpgkey").write_bytes(keys["ctk"].armored)
    (ctk_root / "stable/deb/nvidia-container-toolkit.list").write_text(cat.ctk_list_file(base))

    # Swap the freshly built trees in.
    for top in (cat.CUDA_REPO_ROOT.split("/")[0], cat.CTK_REPO_ROOT):
        target = www / top
        old = www / f".old-{top}"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        (staging / top).rename(target)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    manifest["build_seconds"] = round(time.monotonic() - started, 2)
    (www / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    stamp.write_text(json.dumps({"input_hash": digest}) + "\n")
    return manifest
