"""Regenerate vllm/serve_flags.py from gpunode's vllm-<version>.json (SIMULATION tool).

    python src/gpunode/lab/sim/vllm_standin/gen_serve_flags.py [SOURCE.json] [--check]

SOURCE defaults to src/gpunode/vllm-0.33.0.json, the one list of vLLM 0.33.0's `serve`
flags with their argument kinds that gpunode.core.vllm_flags also loads. The stand-in is a wheel
of its own that cannot import gpunode, so it carries this generated copy; --check only says
whether the committed copy is what the source gives (tests/unit/test_sim_vllm.py checks it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: gpunode's source file (this script runs from a checkout: src/gpunode/lab/sim/vllm_standin/).
SOURCE = HERE.parents[2] / "vllm-0.33.0.json"
TARGET = HERE / "vllm" / "serve_flags.py"


def render(data: dict, source: str) -> str:
    """serve_flags.py's text for the source's serve_flags (named `source` in its header)."""
    kinds = data["kinds"]
    flags: dict[str, str] = data["serve_flags"]
    bad = {f: k for f, k in flags.items() if k not in kinds or not f.startswith("--")}
    if bad:
        raise ValueError(f"{source}: flags not --NAME or kinds not in {sorted(kinds)}: {bad}")
    stray = sorted(set(data.get("kinds_inferred", ())) - set(flags))
    if stray:
        raise ValueError(f"{source}: kinds_inferred names flags not in serve_flags: {stray}")
    lines = [
        f'"""vLLM {data["vllm"]} `serve` flags, generated from {source} by gen_serve_flags.py.',
        'Do not edit: change the source and run the generator."""',
        "",
        "# flag -> kind: " + "; ".join(f"{k} ({what})" for k, what in kinds.items()),
        "SERVE_FLAGS: dict[str, str] = {",
        *(f'    "{f}": "{k}",' for f, k in flags.items()),
        "}",
    ]
    return "\n".join(_wrap(ln) for ln in lines) + "\n"


def _wrap(line: str, width: int = 100) -> str:
    """A long comment line broken into several, at spaces."""
    if not line.startswith("# ") or len(line) <= width:
        return line
    out, cur = [], "#"
    for word in line[2:].split(" "):
        if len(cur) + 1 + len(word) > width:
            out.append(cur)
            cur = "#"
        cur += " " + word
    return "\n".join([*out, cur])


def generate(source: Path = SOURCE) -> str:
    """What TARGET should hold, from `source`."""
    data = json.loads(source.read_text(encoding="utf-8"))
    return render(data, f"src/gpunode/{source.name}")


def main(argv: list[str]) -> int:
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    source = Path(args[0]) if args else SOURCE
    text = generate(source)
    if check:
        if TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is not what {source} gives: run {Path(__file__).name}")
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET} ({text.count(chr(10) + '    ')} flags)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
