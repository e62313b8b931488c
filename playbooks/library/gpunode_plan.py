#!/usr/bin/python
"""Documentation stub: the work is done by playbooks/action_plugins/gpunode_plan.py."""

DOCUMENTATION = r"""
module: gpunode_plan
short_description: A gpunode concern's steps for this host, decided from one snapshot
description:
  - Reads the host with gpunode's snapshot script (one command, the pyinfra deploy's) and
    sets fact C(gpunode_plan) to the concern's steps (gpunode.core.plan.Step as dicts) - key,
    kind (file, command, reboot, stop), title, needed, why and what to do. Read-only; runs
    in check mode.
options:
  concern:
    description: The concern to plan (pve_host).
    type: str
    required: true
author: gpunode
"""

EXAMPLES = r"""
- name: Plan the Proxmox host
  gpunode_plan:
    concern: pve_host
"""

RETURN = r"""
ansible_facts:
  description: C(gpunode_plan), the list of steps.
  returned: always
"""
