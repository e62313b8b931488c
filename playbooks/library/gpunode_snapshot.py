#!/usr/bin/python
"""Documentation stub: the work is done by playbooks/action_plugins/gpunode_snapshot.py."""

DOCUMENTATION = r"""
module: gpunode_snapshot
short_description: Read a gpunode host in one command and derive gpunode's decisions
description:
  - Runs gpunode's snapshot script (stdlib python3) on the host as ONE command - the same
    script and spec as the pyinfra deploy - and sets fact C(gpunode) with what gpunode
    derives from it on the controller (packages to install, holds missing, files already
    right, units, stamps, GPU placement, reboot reasons). Read-only; runs in check mode.
options:
  skip_unchanged:
    description: Report files whose content, mode and owner already match gpunode's
      rendering as C(files_ok), so the roles skip their template tasks (false - every
      template task runs and compares on the host).
    type: bool
    default: true
author: gpunode
"""

EXAMPLES = r"""
- name: Read the host
  gpunode_snapshot:
"""

RETURN = r"""
ansible_facts:
  description: C(gpunode) (see gpunode.engines.ansible.plan.observed).
  returned: always
  type: dict
"""
