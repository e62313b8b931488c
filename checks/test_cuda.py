"""Host CUDA toolkit, NCCL and cuDNN, when the profile enables them (vLLM brings its own)."""

from __future__ import annotations

import re

import pytest

from gpunode.checks import expect
from gpunode.core import desired


def test_cuda_toolkit(node, facts):
    if not node.cuda.enabled:
        pytest.skip("cuda.enabled is false for this node")
    problems = expect.package_problems(desired.cuda_packages(node), facts.packages, facts.holds,
                                       hold=False)
    nvcc = facts.cmd("nvcc")
    m = re.search(r"release (\d+\.\d+)", nvcc["out"])
    if not m or m.group(1) != node.cuda.version:
        problems.append(f"nvcc reports release {m.group(1) if m else None}, expected "
                        f"{node.cuda.version} ({nvcc['err'].strip() or 'no release line'})")
    assert not problems, expect.explain("CUDA toolkit differs", problems)


def test_nccl(node, facts):
    if not node.nccl.enabled:
        pytest.skip("nccl.enabled is false for this node")
    problems = expect.package_problems(desired.nccl_packages(node), facts.packages, facts.holds,
                                       hold=node.nvidia.hold)
    assert not problems, expect.explain("NCCL differs", problems)


def test_cudnn(node, facts):
    if not node.cudnn.enabled:
        pytest.skip("cudnn.enabled is false for this node")
    problems = expect.package_problems(desired.cudnn_packages(node), facts.packages, facts.holds,
                                       hold=node.nvidia.hold)
    assert not problems, expect.explain("cuDNN differs", problems)
