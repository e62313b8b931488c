"""vLLM 0.33.0 `serve` options (long names, without dashes) and the VLLM_* environment
variables the release reads, loaded from the package's vllm-0.33.0.json: the one list, from
which the lab's vLLM stand-in's flag table is also generated (gen_serve_flags.py). Used to
reject unknown `extra_args` and `extra_env` names before any host is touched (vLLM itself
only warns about an unknown VLLM_* variable and goes on without it)."""

from __future__ import annotations

import json
from importlib.resources import files

#: The source file, a data file of the gpunode package.
SOURCE = "vllm-0.33.0.json"

_DATA = json.loads(files("gpunode").joinpath(SOURCE).read_text(encoding="utf-8"))

VLLM_VERSION: str = _DATA["vllm"]
#: Every option `vllm serve` accepts, without the leading dashes.
SERVE_FLAGS = frozenset(flag.removeprefix("--") for flag in _DATA["serve_flags"])
#: The VLLM_* variables vLLM reads (the release's list also names CUDA_HOME and others).
ENV_VARS = frozenset(name for name in _DATA["env_vars"] if name.startswith("VLLM_"))
