"""vLLM: the C toolchain Triton compiles with at run time, a system user, a uv-managed
venv at the pinned version (index override honoured), `vllm@<service>` units from the shared
template with per-service YAML config, environment and a drop-in with GPU UUIDs and
GPU-local CPU/NUMA placement, API keys and the Hugging Face token as systemd credentials
(0600, never on a command line). Services restart only when their inputs changed; services
removed from the profile are stopped and removed."""

from pathlib import Path

from pyinfra.api import deploy

from gpunode.core import desired, files, paths, plan
from gpunode.core.files import ManagedFile, credentials, placements, restart_inputs, vllm_files
from gpunode.core.hostcmd import user_command, venv_command
from gpunode.engines.pyinfra import ops
from gpunode.model import NodeProfile


def read_key(path: str) -> str | None:
    try:
        return Path(path).expanduser().read_text().strip() + "\n"
    except OSError:
        return None


def instance_dropin(p: NodeProfile, name: str, snap) -> ManagedFile | None:
    if not snap.gpus:
        return None
    node = p.model_dump(mode="json")
    svc = next(s for s in node["vllm"]["services"] if s["name"] == name)
    return files.instance_dropin(p, name, svc, placements(p, snap.gpus)[name])


@deploy("vLLM")
def deploy_vllm(p: NodeProfile) -> None:
    v = p.vllm
    ops.remove_stale_services(name="Stop and remove vLLM services no longer in the profile",
                              p=p)
    if not v.services:
        return
    ops.apt_install(name="Install the C compiler and headers Triton builds its launchers with",
                    p=p, packages=[desired.Pkg(n) for n in desired.vllm_build_packages(p)])
    ops.run_when(name=f"Create the {v.user} system user", p=p, tag="user",
                 needed=lambda snap: plan.vllm_user_missing(p, snap),
                 command=user_command(p))
    for path, mode, owner, group in ((paths.VLLM_HOME, 0o755, v.user, v.user),
                                     (v.model_cache, 0o755, v.user, v.user),
                                     (paths.VLLM_ETC, 0o750, "root", v.user),
                                     (paths.VLLM_CREDENTIALS, 0o700, "root", "root")):
        ops.directory(name=f"Directory {path}", p=p, path=path, mode=mode, owner=owner,
                      group=group)
    venv = f"{v.prefix}/venv"
    ops.run_when(name=f"Install vLLM {v.version} in {venv} (uv)", p=p, tag="venv",
                 needed=lambda snap: plan.venv_outdated(p, snap),
                 command=venv_command(p))
    for f in vllm_files(p):
        ops.managed_file(name=f"Write {f.path}", p=p, f=f)
    for svc in v.services:
        ops.placement_file(name=f"Place vllm@{svc.name} on its GPUs' CPUs", p=p,
                           path=paths.vllm_unit_dropin(svc.name),
                           build=lambda snap, name=svc.name: instance_dropin(p, name, snap))
    for cred in credentials(p):
        key = read_key(cred.source)
        if key is None:
            ops.fail(name=f"Stop: the file of {cred.what} missing",
                     message=f"{p.name}: {cred.field} {cred.source} cannot be read on this "
                     "machine")
            return
        ops.secret_file(name=f"Install {cred.what} as a credential", p=p, path=cred.path,
                        content=key)
    dropins = [paths.vllm_unit_dropin(s.name) for s in v.services]
    ops.daemon_reload(name="Reload systemd units", p=p,
                      unit_paths=[*paths.TEMPLATE_UNITS, *dropins])
    for svc in v.services:
        inputs = (*restart_inputs(p, svc.name), "venv")
        ops.unit(name=f"Run vllm@{svc.name} (waits for /health)", p=p,
                 unit_name=desired.vllm_unit(svc.name), running=lambda snap: snap.smi_ok,
                 restart_when=inputs)
