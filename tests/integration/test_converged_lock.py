"""Lock, manifest and drift on the session's converged lab VM (`converged_lab`, no deploy of
its own): the manifest the deploy wrote is there and readable; a lock resolved from the lab's
SIMULATED mirrors agrees with the node; `gpunode drift` names a hand-edited managed file and
a manually installed other version of a package; the VM is restored afterwards.

It runs before test_deploy.py (file order): the driver upgrade test there moves the same VM
to another driver."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from convergence import drift, gpunode_cli, lab_via, lock, manifest

from gpunode.core import desired
from gpunode.core.manifest import MANIFEST_PATH

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EDITED = "/etc/sysctl.d/60-gpunode.conf"
OTHER = "nvidia-modprobe"  # dependents need only >=, so another version installs cleanly


def _site(converged_lab, tmp_path: Path) -> Path:
    """The lab site with only the pyinfra-converged node, in a directory of its own (the
    lock is written beside it, not beside the session's site)."""
    doc = yaml.safe_load(Path(converged_lab.site).read_text())
    doc["nodes"] = {converged_lab.name: doc["nodes"][converged_lab.name]}
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(doc, sort_keys=False))
    return site


def test_manifest_lock_and_drift_on_the_converged_node(converged_lab, tmp_path):
    vm, node, p = converged_lab.vm, converged_lab.name, converged_lab.profile
    site = _site(converged_lab, tmp_path)

    # the manifest the deploy wrote
    m = manifest(site, node)
    assert m["node"] == node and m["kernel"] == vm.check("uname -r").strip()
    assert m["driver_module"] == p.nvidia.version
    assert len(m["gpus"]) == p.gpus.count and all(g["uuid"].startswith("GPU-") and g["vbios"]
                                                  for g in m["gpus"])
    assert m["packages"][desired.driver_packages(p)[0]] == desired.driver_deb_version(p)
    assert m["vllm"]["version"].startswith(p.vllm.version) and m["vllm"]["dependency_hash"]
    assert EDITED in m["files"]
    assert vm.check(f"stat -c %a {MANIFEST_PATH}").strip() == "644"

    # a lock from the lab's mirrors (guests see them at 10.0.2.2, this machine at 127.0.0.1)
    entry = lock(site)[node]
    assert entry["nvidia"]["driver"] == p.nvidia.version
    assert entry["nvidia"]["packages"][OTHER]["version"] == desired.driver_deb_version(p)
    assert entry["nvidia"]["packages"][OTHER]["mirror"].startswith(lab_via().split("=")[0] + "/")

    rc, findings = drift(site, node)
    assert [f for f in findings if f["kind"] in ("lock", "file")] == [], findings

    other = vm.check(f"apt-cache madison {OTHER} | awk '{{print $3}}'").split()
    newer = next(v for v in other if not v.startswith(p.nvidia.version))
    vm.check(f"sudo cp -a {EDITED} /root/gpunode-test-saved.conf")
    try:
        vm.check(f"echo 'vm.swappiness = 1  # hand edit' | sudo tee -a {EDITED} >/dev/null")
        vm.check(f"sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y "
                 f"--allow-change-held-packages install {OTHER}={newer}", timeout=600)
        rc, findings = drift(site, node)
        assert rc == 1
        got = {(f["kind"], f["item"]): f for f in findings}
        assert got[("lock", OTHER)]["expected"] == desired.driver_deb_version(p)
        assert got[("lock", OTHER)]["live"] == newer
        assert ("file", EDITED) in got
        rc, out, _ = gpunode_cli("drift", node, "--site", str(site), timeout=600)
        assert rc == 1 and OTHER in out and EDITED in out
    finally:
        vm.check(f"sudo mv /root/gpunode-test-saved.conf {EDITED}")
        vm.check(f"sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y --allow-downgrades "
                 f"--allow-change-held-packages install {OTHER}={desired.driver_deb_version(p)} && "
                 f"sudo apt-mark hold {OTHER}", timeout=600)
    rc, findings = drift(site, node)
    assert [f for f in findings if f["kind"] in ("lock", "file")] == [], findings
