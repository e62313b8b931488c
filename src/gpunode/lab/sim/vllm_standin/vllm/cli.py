"""`vllm` console script of the SIMULATION stand-in (gpunode lab).

Parses `vllm serve` exactly like vLLM 0.33.0 would accept it (flag table in
serve_flags.py), checks the simulated GPUs, logs vLLM-like start-up lines and starts the
OpenAI-compatible HTTP server in server.py. No model is loaded.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import yaml

from vllm import __version__
from vllm.serve_flags import SERVE_FLAGS

SHORT_ALIASES = {
    "-tp": "--tensor-parallel-size",
    "-pp": "--pipeline-parallel-size",
    "-dp": "--data-parallel-size",
    "-q": "--quantization",
}


class StandinError(Exception):
    """A start-up failure; the message is what vLLM would print (exception class: kind)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------ logging


class Log:
    def __init__(self) -> None:
        self.pid = os.getpid()

    def __call__(
        self, msg: str, proc: str = "APIServer", level: str = "INFO", where: str = "api_server.py:1"
    ) -> None:
        pid = self.pid + {"APIServer": 0, "EngineCore_DP0": 1}.get(proc, 2)
        if proc.startswith("Worker_TP"):
            pid += int(proc[9:])
        stamp = time.strftime("%m-%d %H:%M:%S")
        print(f"({proc} pid={pid}) {level} {stamp} [{where}] {msg}", flush=True)

    def plain(self, msg: str) -> None:
        print(f"(APIServer pid={self.pid}) {msg}", flush=True)


# ------------------------------------------------------------------ argument parsing


def _int_with_suffix(text: str) -> int:
    """vLLM's human-readable ints (--max-model-len): 32k = 32000, 32K = 32768, -1 / auto."""
    t = text.strip()
    if t.lower() in ("auto", "-1"):
        return -1
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG]?)", t)
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected an integer like 32768, 32k or 32K"
        )
    suffix = m.group(2)
    mult = 1 if not suffix else (1000 if suffix.islower() else 1024) ** ("kmg".index(suffix.lower()) + 1)
    return int(float(m.group(1)) * mult)


def _json_dict(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # vLLM also accepts plain strings for some config flags (e.g. -O level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm serve",
        usage="vllm serve [model_tag] [options]",
        description="SIMULATION: gpunode lab stand-in for `vllm serve` (vLLM 0.33.0 flags).",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("model_tag", nargs="?", default=None)
    parser.add_argument("--config", default=None)
    for flag, kind in SERVE_FLAGS.items():
        dest = flag[2:].replace("-", "_")
        names = [flag] + [a for a, f in SHORT_ALIASES.items() if f == flag]
        if kind == "help":
            parser.add_argument(*names, action="help")
        elif kind == "bool":
            parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None)
        elif kind == "list":
            parser.add_argument(*names, dest=dest, nargs="+", default=None)
        elif kind == "json":
            parser.add_argument(*names, dest=dest, type=_json_dict, default=None)
        elif kind == "int":
            parser.add_argument(*names, dest=dest, type=int, default=None)
        elif kind == "float":
            parser.add_argument(*names, dest=dest, type=float, default=None)
        elif flag == "--max-model-len":
            parser.add_argument(*names, dest=dest, type=_int_with_suffix, default=None)
        else:
            parser.add_argument(*names, dest=dest, default=None)
    return parser


def _normalize(argv: list[str]) -> list[str]:
    """--max_model_len -> --max-model-len (vLLM's FlexibleArgumentParser does the same)."""
    out = []
    for a in argv:
        if a.startswith("--") and not a.startswith("---"):
            name, eq, val = a.partition("=")
            out.append(name.replace("_", "-") + eq + val)
        else:
            out.append(a)
    return out


def _fold_dotted(argv: list[str]) -> list[str]:
    """--compilation-config.mode 3 -> --compilation-config '{"mode": 3}' (vLLM's dotted form)."""
    out: list[str] = []
    dotted: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, val = a.partition("=")
        base, dot, sub = name.partition(".")
        if a.startswith("--") and dot and SERVE_FLAGS.get(base) == "json":
            if not eq:
                if i + 1 >= len(argv):
                    out.append(a)  # let argparse report it
                    i += 1
                    continue
                val = argv[i + 1]
                i += 1
            node = dotted.setdefault(base, {})
            keys = sub.split(".")
            for k in keys[:-1]:
                node = node.setdefault(k.replace("-", "_"), {})
            try:
                node[keys[-1].replace("-", "_")] = json.loads(val)
            except json.JSONDecodeError:
                node[keys[-1].replace("-", "_")] = val
        else:
            out.append(a)
        i += 1
    for base, d in dotted.items():
        out += [base, json.dumps(d)]
    return out


def _config_args(path: str, unknown: list[str]) -> list[str]:
    """Turn a --config YAML file into command-line arguments (vLLM's rules)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except OSError as exc:
        raise StandinError("FileNotFoundError", f"Config file {path} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise StandinError("ValueError", f"Config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise StandinError("ValueError", f"Config file {path} must be a YAML mapping of flag: value")
    args: list[str] = []
    for key, value in doc.items():
        flag = "--" + str(key).replace("_", "-")
        if flag == "--model":
            args += [flag, str(value)]
            continue
        kind = SERVE_FLAGS.get(flag)
        if kind is None:
            unknown += [flag, *([] if value is None else [str(value)])]
            continue
        if kind == "bool":
            if value is True:
                args.append(flag)
            elif value is False:
                args.append("--no-" + flag[2:])
            else:
                raise StandinError("ValueError", f"{path}: {key} must be true or false, not {value!r}")
        elif isinstance(value, list):
            args += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def parse_serve(argv: list[str]) -> argparse.Namespace:
    argv = [SHORT_ALIASES.get(a, a) for a in _normalize(argv)]
    expanded: list[str] = []
    unknown: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            expanded += _config_args(argv[i + 1], unknown)
            i += 2
            continue
        if a.startswith("--config="):
            expanded += _config_args(a.split("=", 1)[1], unknown)
            i += 1
            continue
        expanded.append(a)
        i += 1
    parser = build_parser()
    ns, extra = parser.parse_known_args(_fold_dotted(expanded))
    if extra or unknown:
        parser.error(f"unrecognized arguments: {' '.join(extra + unknown)}")
    if ns.model_tag is not None:
        ns.model = ns.model_tag
    if not ns.model:
        ns.model = "Qwen/Qwen3-0.6B"  # vLLM's default model
    return ns


# ------------------------------------------------------------------ simulated GPUs


@dataclass
class Gpu:
    index: int
    uuid: str
    name: str
    total_mib: int
    used_mib: int
    free_mib: int


def probe_gpus() -> list[Gpu]:
    """All simulated GPUs via nvidia-smi (fails as the real driver would)."""
    smi = os.environ.get("GPUNODE_SIM_NVIDIA_SMI") or shutil.which("nvidia-smi")
    if not smi:
        raise StandinError("RuntimeError", "Failed to infer device type (no NVIDIA driver found)")
    cmd = [smi] if not smi.endswith(".py") and os.access(smi, os.X_OK) else [sys.executable, smi]
    r = subprocess.run(
        [
            *cmd,
            "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        first = (r.stdout or r.stderr).strip().splitlines()[:1]
        raise StandinError(
            "RuntimeError",
            "Failed to initialize CUDA: the NVIDIA driver is not usable "
            f"(nvidia-smi exit {r.returncode}: {first[0] if first else 'no output'})",
        )
    gpus = []
    for line in r.stdout.strip().splitlines():
        i, u, n, t, used, free = (c.strip() for c in line.split(","))
        gpus.append(Gpu(int(i), u, n, int(t), int(used), int(free)))
    return gpus


def visible_gpus(all_gpus: list[Gpu], env: str | None) -> list[Gpu]:
    """The GPUs CUDA enumerates under CUDA_VISIBLE_DEVICES, in its order. An entry is an
    nvidia-smi index or a GPU UUID as nvidia-smi -L prints it (GPU-...); at the first entry
    that names no GPU enumeration stops, as in CUDA (0,2,-1,1 makes 0 and 2 visible). CUDA
    also takes a unique UUID prefix (GPU-8932f937), but vLLM looks UUIDs up with
    nvmlDeviceGetHandleByUUID, which wants the whole UUID, and fails on it."""
    if env is None:
        return all_gpus
    out: list[Gpu] = []
    for item in (x.strip() for x in env.split(",")):
        if not item:
            continue
        match = [g for g in all_gpus if item == str(g.index) or item == g.uuid]
        if not match:
            prefixed = [g for g in all_gpus if item.startswith("GPU-") and g.uuid.startswith(item)]
            if len(prefixed) == 1:
                raise StandinError("pynvml.NVMLError_NotFound", "Not Found")
            break  # this device and every one after it stay invisible
        out.append(match[0])
    if not out:
        raise StandinError("RuntimeError", "No CUDA GPUs are available")
    return out


# What torch raises when cuInit fails with CUDA_ERROR_UNKNOWN (999), as it does when
# /dev/nvidia-uvm is missing and CUDA's nvidia-modprobe cannot create it.
CUDA_UNKNOWN_ERROR = (
    "CUDA unknown error - this may be due to an incorrectly set up environment, e.g. changing "
    "env variable CUDA_VISIBLE_DEVICES after program start. Setting the available devices to "
    "be zero."
)


def ensure_uvm(root: str) -> None:
    """cuInit without /dev/nvidia-uvm runs the setuid nvidia-modprobe -u -c=0 to load
    nvidia-uvm and create the node; when that fails (not installed, or setuid ignored under
    NoNewPrivileges=) CUDA reports error 999 and torch sees no GPU."""
    if os.path.lexists(os.path.join(root, "dev/nvidia-uvm")):
        return
    helper = os.path.join(root, "usr/bin/nvidia-modprobe")
    ok = os.path.isfile(helper) and subprocess.run(
        [helper, "-u", "-c=0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, check=False).returncode == 0
    if not (ok and os.path.lexists(os.path.join(root, "dev/nvidia-uvm"))):
        raise StandinError("RuntimeError", CUDA_UNKNOWN_ERROR)


def check_device_nodes(gpus: list[Gpu]) -> None:
    """CUDA opens /dev/nvidiactl, /dev/nvidia-uvm and /dev/nvidia<N>; a missing nvidia-uvm
    node, or a sandbox that hides or denies them (PrivateDevices=, DevicePolicy= without
    DeviceAllow=), breaks vLLM."""
    root = os.environ.get("GPUNODE_SIM_ROOT", "/") or "/"
    ensure_uvm(root)
    for dev in ["nvidiactl", "nvidia-uvm", *(f"nvidia{g.index}" for g in gpus)]:
        p = os.path.join(root, "dev", dev)
        try:
            fd = os.open(p, os.O_RDWR)
            os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENODEV):
                continue  # the node is reachable; no real driver backs it in the lab
            raise StandinError(
                "RuntimeError",
                f"No CUDA GPUs are available (cannot open /dev/{dev}: {exc.strerror}; check the "
                "service's device access: PrivateDevices=, DevicePolicy=, DeviceAllow=)",
            ) from exc


# ------------------------------------------------------------------ model shapes / KV math


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    params_b: float
    max_pos: int


KNOWN_SHAPES = {  # shared/research/domain.md §4.4
    "llama-3.1-8b": Shape(32, 32, 8, 128, 8.03, 131072),
    "llama-3.1-70b": Shape(80, 64, 8, 128, 70.55, 131072),
    "qwen2.5-32b": Shape(64, 40, 8, 128, 32.76, 32768),
    "mixtral-8x7b": Shape(32, 32, 8, 128, 46.70, 32768),
    "qwen3-0.6b": Shape(28, 16, 8, 128, 0.6, 40960),
}


def model_shape(model: str) -> Shape:
    cfg_path = os.path.join(model, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            c = json.load(f)
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        layers = int(c["num_hidden_layers"])
        params = (12 * layers * hidden * hidden + 2 * int(c.get("vocab_size", 32000)) * hidden) / 1e9
        return Shape(
            layers,
            heads,
            int(c.get("num_key_value_heads", heads)),
            int(c.get("head_dim", hidden // heads)),
            params,
            int(c.get("max_position_embeddings", 4096)),
        )
    low = model.lower()
    for key, shape in KNOWN_SHAPES.items():
        if key in low:
            return shape
    return KNOWN_SHAPES["llama-3.1-8b"]


@dataclass
class Plan:
    weights_gib: float
    kv_gib: float
    tokens: int
    max_model_len: int
    per_gpu_mib: int


def plan_memory(ns: argparse.Namespace, gpus: list[Gpu], tp: int) -> Plan:
    shape = model_shape(ns.model)
    if shape.heads % tp:
        raise StandinError(
            "ValueError",
            f"Total number of attention heads ({shape.heads}) must be divisible by tensor "
            f"parallel size ({tp}).",
        )
    util = ns.gpu_memory_utilization if ns.gpu_memory_utilization is not None else 0.92
    if not 0 < util <= 1:
        raise StandinError("ValueError", f"GPU memory utilization must be within (0, 1]. Got {util}.")
    gpu = gpus[0]
    total_gib = gpu.total_mib / 1024 - 0.5  # what CUDA reports as total on an A6000
    requested = total_gib * util
    free_gib = gpu.free_mib / 1024
    for g in gpus:
        if g.free_mib / 1024 < requested:
            raise StandinError(
                "ValueError",
                f"Free memory on device cuda:{gpus.index(g)} ({g.free_mib / 1024:.2f}/"
                f"{g.total_mib / 1024:.2f} GiB) on startup is less than desired GPU memory "
                f"utilization ({util}, {requested:.2f} GiB). Decrease GPU memory utilization or "
                "reduce GPU memory used by other processes.",
            )
    del free_gib
    quant = (ns.quantization or "").lower()
    bits = 4.16 if quant in ("awq", "gptq", "awq_marlin", "gptq_marlin") or "awq" in ns.model.lower() else 16
    weights = shape.params_b * 1e9 * bits / 8 / 2**30
    overhead = 2.0 if tp == 1 else 2.5
    kv_bytes = 1 if (ns.kv_cache_dtype or "auto").startswith("fp8") else 2
    if ns.kv_cache_memory_bytes:
        kv_gib = _int_with_suffix(str(ns.kv_cache_memory_bytes)) / 2**30
    else:
        kv_gib = requested - weights / tp - overhead
    if kv_gib <= 0:
        raise StandinError(
            "ValueError",
            "No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
            "when initializing the engine.",
        )
    per_token = 2 * shape.layers * max(1, math.ceil(shape.kv_heads / tp)) * shape.head_dim * kv_bytes
    block = ns.block_size or 16
    tokens = int(kv_gib * 2**30 // per_token // block * block)
    mml = ns.max_model_len if ns.max_model_len not in (None, -1) else shape.max_pos
    if ns.max_model_len == -1:
        mml = min(shape.max_pos, tokens)
    if tokens < mml:
        need = mml * per_token / 2**30
        raise StandinError(
            "ValueError",
            f"To serve at least one request with the models's max seq len ({mml}), ({need:.1f} "
            f"GiB KV cache is needed, which is larger than the available KV cache memory "
            f"({kv_gib:.2f} GiB). Based on the available memory, the estimated maximum model "
            f"length is {tokens}. Try increasing `gpu_memory_utilization` or decreasing "
            "`max_model_len` when initializing the engine. See "
            "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.",
        )
    return Plan(weights, kv_gib, tokens, mml, int(requested * 1024))


# ------------------------------------------------------------------ serve


def _non_default(ns: argparse.Namespace) -> dict[str, Any]:
    hidden = {"api_key", "hf_token", "model_tag", "config"}
    return {k: v for k, v in vars(ns).items() if v is not None and k not in hidden}


def serve(argv: list[str]) -> int:
    try:
        ns = parse_serve(argv)
    except StandinError as exc:
        print(f"{exc.kind}: {exc}", file=sys.stderr)
        return 2
    log = Log()
    if any(a == "--model" or a.startswith("--model=") for a in argv):
        log(
            "With `vllm serve`, you should provide the model as a positional argument or in a "
            "config file instead of via the `--model` option.",
            level="WARNING",
            where="argparse_utils.py:1",
        )
    log(f"vLLM API server version {__version__}", where="api_server.py:1896")
    log(f"non-default args: {_non_default(ns)}", where="utils.py:328")
    log(
        "SIMULATION: gpunode lab stand-in for vLLM; no model is loaded or run",
        level="WARNING",
        where="standin.py:1",
    )
    keys = list(ns.api_key or [])
    if not keys and os.environ.get("VLLM_API_KEY"):
        keys = [os.environ["VLLM_API_KEY"]]
    try:
        all_gpus = probe_gpus()
        visible = visible_gpus(all_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
        tp = ns.tensor_parallel_size or 1
        pp = ns.pipeline_parallel_size or 1
        world = tp * pp
        if world > len(visible):
            raise StandinError(
                "ValueError",
                f"World size ({world}) is larger than the number of available GPUs "
                f"({len(visible)}) in this node. If this is intentional and you are using: "
                "- ray, set '--distributed-executor-backend ray'. - multiprocessing, set "
                "'--nnodes' appropriately.",
            )
        used = visible[:world]
        check_device_nodes(used)
        plan = plan_memory(ns, used, tp)
    except StandinError as exc:
        log("EngineCore failed to start.", proc="EngineCore_DP0", level="ERROR", where="core.py:708")
        print(f"{exc.kind}: {exc}", flush=True)
        return 1
    log(f"Using max model len {plan.max_model_len}", where="__init__.py:1815")
    for r in range(tp):
        log(
            f"Model loading took {plan.weights_gib / tp:.4f} GiB and 0.51 seconds",
            proc=f"Worker_TP{r}" if tp > 1 else "EngineCore_DP0",
            where="gpu_model_runner.py:2392",
        )
    for r in range(tp):
        log(
            f"Available KV cache memory: {plan.kv_gib:.2f} GiB",
            proc=f"Worker_TP{r}" if tp > 1 else "EngineCore_DP0",
            where="gpu_worker.py:298",
        )
    log(f"GPU KV cache size: {plan.tokens:,} tokens", proc="EngineCore_DP0", where="kv_cache_utils.py:1028")
    log(
        f"Maximum concurrency for {plan.max_model_len:,} tokens per request: "
        f"{plan.tokens / plan.max_model_len:.2f}x",
        proc="EngineCore_DP0",
        where="kv_cache_utils.py:1032",
    )

    from vllm import server

    return server.run(ns, keys, used, plan, log)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-v"]):
        print(__version__)
        return 0
    if argv[:1] != ["serve"]:
        print(
            "usage: vllm [-h] [-v] {serve} ...  (SIMULATION: gpunode lab stand-in; only "
            "`serve` is implemented)",
            file=sys.stderr,
        )
        return 2
    return serve(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
