#!/usr/bin/python
"""Documentation stub: the work is done on the controller by
playbooks/action_plugins/gpunode_desired.py (it imports gpunode)."""

DOCUMENTATION = r"""
module: gpunode_desired
short_description: gpunode's desired values for the host's resolved profile
description:
  - Reads hostvar C(node) (the resolved profile from gpunode's inventory), validates it
    with gpunode's model and sets fact C(gpunode_desired) - files to write (template, path,
    mode, owner, per-instance variables), package specs, holds, repository keys, runtimes,
    vLLM units and directories. Runs on the controller only; nothing is sent to the host.
options:
  gpus:
    description: Synthetic GPU list (gpunode.core.topology.Gpu fields); used by the render parity
      test to include GPU-placement drop-ins.
    type: list
    elements: dict
author: gpunode
"""

EXAMPLES = r"""
- name: Compute what this node should be
  gpunode_desired:
"""

RETURN = r"""
ansible_facts:
  description: C(gpunode_desired) (see gpunode.engines.ansible.plan.desired).
  returned: always
  type: dict
"""
