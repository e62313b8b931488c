"""The lab as a gpunode site: running lab VMs + the simulated NVIDIA stack (SIMULATION).

`prepare_lab()` builds and serves the simulated repositories and index on loopback;
`prepare_guest()` gives a VM its simulated GPUs (and a local model directory, as an
operator of an air-gapped host would copy one); `write_lab_site()` writes a site file from
inventory/examples/lab.yaml with the VMs' connections and the mirrors' facts (keyring
checksum, uv version, driver version) filled in. `pvesim_nodes()` is the Proxmox side:
pvesim's node `pve1` (API token, the two simulated A6000s as PCI mappings) and one GPU VM
to provision on it from the lab image."""

from __future__ import annotations

import copy
import json
import secrets
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from gpunode.lab.core import VM, Lab
from gpunode.model.parts import OS_PYTHON, VllmPython, distro_of

REPO = Path(__file__).resolve().parents[3]
LAB_EXAMPLE = REPO / "inventory" / "examples" / "lab.yaml"
GUEST_GPUS = "/etc/gpunode-sim/gpus.json"
#: A small Llama-shaped model config: what an operator copies to an air-gapped host, minus
#: the weights (the vLLM stand-in reads the shape only). SIMULATION.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
    "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 4096, "gpunode_simulation": True,
}


def prepare_lab(state_dir: Path | None = None) -> dict[str, Any]:
    """Build (cached) and serve the simulated repositories; returns the sim facts."""
    from gpunode.lab import sim
    from gpunode.lab.sim import server

    facts = sim.prepare()
    server.start(root=facts["www_root"], state_dir=state_dir)
    return facts


def prepare_guest(vm: VM, gpus_json: str | None = None, models: tuple[str, ...] = (),
                  write_gpus: bool = True) -> None:
    """Install the simulated GPU description and model directories in a guest.
    `write_gpus=False` leaves the GPUs alone (a pvesim VM: pvesim writes them from the VM's
    hostpci devices)."""
    from gpunode.lab.sim import gpus

    script = []
    if write_gpus:
        doc = gpus_json or gpus.to_json(gpus.default_a6000x2())
        script += [f"install -d -m 755 {Path(GUEST_GPUS).parent}",
                   f"cat > {GUEST_GPUS} <<'GPUNODE_EOF'\n{doc.rstrip()}\nGPUNODE_EOF"]
    for model in models:
        script.append(f"install -d -m 755 {model} && cat > {model}/config.json <<'GPUNODE_EOF'\n"
                      f"{json.dumps(TINY_CONFIG, indent=1)}\nGPUNODE_EOF")
    # A first boot is done when cloud-init is: it restarts sshd late (host keys), which
    # otherwise drops the next SSH connection a deploy opens.
    vm.run("cloud-init status --wait >/dev/null 2>&1", timeout=900)
    if script:
        vm.check("sudo sh -c " + _quote("\n".join(script)))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def lab_site(lab: Lab, facts: dict[str, Any], base_path: Path = LAB_EXAMPLE,
             key_dir: Path | None = None) -> dict[str, Any]:
    """The lab example with mirror facts and VM connections filled in."""
    base = yaml.safe_load(base_path.read_text())
    doc = copy.deepcopy(base)
    group = doc.setdefault("groups", {}).setdefault("lab", {})
    nvidia = group.setdefault("nvidia", {})
    nvidia["repo_url"] = facts["nvidia_repo_url"]
    nvidia["keyring_sha256"] = facts["keyring_sha256"]
    if nvidia.get("version") not in facts["driver_versions"]:
        nvidia["version"] = sorted(facts["driver_versions"])[0]
    ctk = group.setdefault("container_toolkit", {})
    if ctk.get("enabled"):
        ctk["repo_url"] = facts["container_toolkit_repo_url"].removesuffix("/$(ARCH)")
        ctk["version"] = sorted(facts["container_toolkit_versions"])[-1].split("-")[0]
    vllm = group.setdefault("vllm", {})
    vllm["index_url"] = facts["pypi_index_url"]
    if facts.get("uv_version"):
        vllm["uv_version"] = facts["uv_version"]
    keys = key_dir or (lab.dir / "keys")
    keys.mkdir(parents=True, exist_ok=True)
    for svc in vllm.get("services", []):
        if svc.get("api_key_file"):
            svc["api_key_file"] = _secret(keys / f"{svc['name']}.key", "")
    if vllm.get("hf_token_file"):  # SIMULATION: no hub is reached; shaped like a real token
        vllm["hf_token_file"] = _secret(keys / "hf-token", "hf_")
    running = {vm.name for vm in lab.status() if vm.running}
    doc["nodes"] = {name: node for name, node in (doc.get("nodes") or {}).items()
                    if name in running}
    doc = lab.site(doc)
    # Per guest OS (lab.site wrote each VM's): the simulated repository's keyring for its
    # distro, and its own python3 (the lab's index serves wheels for each; uv downloads
    # nothing).
    by_distro = facts["keyring_sha256_by_distro"]
    for node in doc["nodes"].values():
        node.setdefault("nvidia", {})["keyring_sha256"] = by_distro[distro_of(node["os"])]
        vllm_node = node.setdefault("vllm", {})
        if _runs_vllm(OS_PYTHON[node["os"]]):
            vllm_node["python"] = OS_PYTHON[node["os"]]
        else:
            # Ubuntu 22.04's python3 is 3.10 and vLLM needs 3.11 or newer: a real site runs
            # vLLM there only with a uv-managed Python from vllm.python_mirror, a mirror of
            # python-build-standalone, which the lab cannot fill (GitHub is out of reach and
            # uv checks each archive against its own checksum table). Such a node gets no
            # vLLM services, token or package index (whose python check would, rightly,
            # refuse a Python the OS does not ship); everything else (driver, CUDA, NCCL,
            # DCGM, container toolkit, tuning) is deployed as on the others.
            vllm_node.update(services=[], index_url=None, hf_token_file=None)
    return doc


def _runs_vllm(python: str) -> bool:
    """Whether the model accepts `python` for vLLM (model.parts.VllmPython)."""
    try:
        TypeAdapter(VllmPython).validate_python(python)
    except ValidationError:
        return False
    return True


def _secret(path: Path, prefix: str) -> str:
    """A random secret in a 0600 file (kept across calls), for the lab site to name."""
    if not path.exists():
        path.write_text(prefix + secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)
    return str(path)


def write_lab_site(lab: Lab, facts: dict[str, Any], out: Path,
                   base_path: Path = LAB_EXAMPLE) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Written by gpunode lab (SIMULATION mirrors on 10.0.2.2).\n"
                   + yaml.safe_dump(lab_site(lab, facts, base_path), sort_keys=False))
    return out


# ---- pvesim: the simulated Proxmox VE host and a GPU VM provisioned on it -------------------

#: What a provisioning token holds on pvesim (PVE roles): manage VMs, create the PCI
#: mappings, use storage, read the node (`gpunode provision` reads hardware and resources).
PROVISION_TOKEN_ACL = [("/vms", "PVEVMAdmin"), ("/mapping/pci", "PVEMappingAdmin"),
                       ("/storage", "PVEDatastoreUser"), ("/", "PVEAuditor")]
#: The lab base image as pvesim's "cloud image" (`PveSim.import_image(image, LAB_IMAGE)`).
LAB_IMAGE = "debian-12-lab.qcow2"
#: pvesim's two simulated RTX A6000s (node pve1), one PCI mapping each.
A6000_MAPPINGS = [{"name": "a6000-0", "addresses": ["0000:01:00"]},
                  {"name": "a6000-1", "addresses": ["0000:41:00"]}]


def image_size_gib(path: Path) -> int:
    """The virtual size of a disk image in GiB, rounded up (a VM disk may not be smaller)."""
    import subprocess

    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                          capture_output=True, text=True, check=True).stdout
    return -(-int(json.loads(info)["virtual-size"]) // (1 << 30))


def pvesim_nodes(lab: Lab, pve: Any, token_id: str, secret_file: Path, *, node: str,
                 vmid: int, memory_mib: int = 2048, ssh_port: int = 22,
                 groups: tuple[str, ...] = ("lab",)) -> dict[str, Any]:
    """Site nodes for pvesim (a running `PveSim`): the pve-host `pve1` with its API (token
    whose secret is in `secret_file`, pvesim's CA) and the A6000 mappings, and the
    pve-guest `node`: VM `vmid` from the imported lab image with both GPUs, cloud-init
    user and the lab's key, reached at 127.0.0.1:`ssh_port` (the lab's forward of the
    guest's SSH, standing in for the address a site gives the VM)."""
    from gpunode.lab import image
    from gpunode.model.parts import VmSpec
    from gpunode.proxmox.spec import guest_gpu_addresses

    vm = {"pve_node": pve.node, "vmid": vmid, "cloud_image": f"local:import/{LAB_IMAGE}",
          "cores": 2, "memory_mib": memory_mib,
          "disk_gib": max(8, image_size_gib(image.ensure_image())),
          "hostpci": [{"mapping": m["name"]} for m in A6000_MAPPINGS],
          "cloud_init": {"user": "gpunode", "ssh_keys": [lab._pubkey().strip()]},
          "agent_timeout_s": 900}
    return {
        "pve1": {"kind": "pve-host", "os": "debian-12",
                 "connection": {"address": "127.0.0.1", "user": "root"},
                 "vllm": {"services": []},
                 "pve": {"api": {"url": f"https://{pve.host}:{pve.port}",
                                 "token_id": token_id, "token_secret_file": str(secret_file),
                                 "verify_tls": str(pve.ca_path)},
                         "pci_mappings": copy.deepcopy(A6000_MAPPINGS)}},
        node: {"groups": list(groups), "kind": "pve-guest",
               "connection": {"address": "127.0.0.1", "port": ssh_port, "user": "gpunode",
                              "key": str(lab.key_path), "become": True},
               "gpus": {"count": len(A6000_MAPPINGS),
                        "pci_addresses": guest_gpu_addresses(VmSpec.model_validate(vm))},
               "vm": vm}}
