"""cloud-init NoCloud seeds (an ISO labelled `cidata`) for lab VMs."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from gpunode.lab.errors import LabError

USER = "gpunode"


def user_data(hostname: str, pubkey: str) -> str:
    doc = {
        "hostname": hostname,
        "fqdn": hostname,
        "manage_etc_hosts": True,
        "users": [{
            "name": USER,
            "gecos": "gpunode lab user",
            "shell": "/bin/bash",
            "groups": ["sudo"],
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "lock_passwd": True,
            "ssh_authorized_keys": [pubkey.strip()],
        }],
        "disable_root": True,
        "growpart": {"mode": "auto", "devices": ["/"]},
        "resize_rootfs": True,
        # The image has no `locales` package; cloud-init's default (en_US.UTF-8) would fail.
        "locale": False,
    }
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)


def meta_data(hostname: str, instance_id: str) -> str:
    return yaml.safe_dump({"instance-id": instance_id, "local-hostname": hostname},
                          sort_keys=False)


def iso_tool() -> list[str]:
    """The mkisofs-compatible command available here."""
    if shutil.which("xorriso"):
        return ["xorriso", "-as", "mkisofs"]
    if shutil.which("genisoimage"):
        return ["genisoimage"]
    raise LabError(
        "neither xorriso nor genisoimage is installed (needed for cloud-init seeds); "
        "run `gpunode lab deps --install` or `apt-get install -y xorriso`"
    )


def write_seed(path: Path, hostname: str, instance_id: str, pubkey: str) -> None:
    with tempfile.TemporaryDirectory(prefix="gpunode-seed-") as tmp:
        t = Path(tmp)
        (t / "user-data").write_text(user_data(hostname, pubkey))
        (t / "meta-data").write_text(meta_data(hostname, instance_id))
        cmd = [*iso_tool(), "-quiet", "-output", str(path), "-volid", "cidata", "-joliet",
               "-rock", str(t / "user-data"), str(t / "meta-data")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise LabError(f"making the cloud-init seed {path} failed: {res.stderr.strip()}")
