#!/usr/bin/python
"""Documentation stub: the work is done on the controller by
playbooks/action_plugins/gpunode_provision.py (it imports gpunode.proxmox)."""

DOCUMENTATION = r"""
module: gpunode_provision
short_description: Create, converge or destroy a host's Proxmox GPU VM with gpunode
description:
  - Reads the site file (hostvar C(gpunode_site) from gpunode's inventory), computes the
    host's VM from its C(vm) section and drives the Proxmox VE API through
    gpunode.proxmox - the same code as C(gpunode provision) and C(gpunode destroy).
  - PCI resource mappings the VM uses are created or updated first; an existing VM is
    converged key by key; a change that needs a restart is applied only when the node's
    C(reboot) policy is C(auto).
  - Credentials come from the PVE host node's C(pve.api) section or the PROXMOX_*
    environment variables; they never appear in the result.
  - Supports check mode (the plan is returned, nothing changes).
options:
  state:
    description: C(present) creates or converges the VM; C(absent) destroys it (purge).
    type: str
    choices: [present, absent]
    default: present
  node:
    description: Site node to act on (default the inventory host).
    type: str
  site:
    description: Site file (default hostvar C(gpunode_site)).
    type: path
  wait:
    description: After a start, wait for the guest agent's address.
    type: bool
    default: true
author: gpunode
"""

EXAMPLES = r"""
- name: Create or converge this node's VM
  gpunode_provision:
    state: present
"""

RETURN = r"""
plan:
  description: The planned changes (target, action, key, old, new, note, restart, applied).
  returned: always
  type: list
done:
  description: The changes made.
  returned: always
  type: list
address:
  description: The IPv4 address the guest agent reported.
  returned: when the VM runs and its agent answers
  type: str
"""
