"""Small site documents the unit tests build on."""

NODE = """
nodes:
  gpu01:
    connection: {address: gpu01.example}
    gpus: {count: 2}
"""
GUEST = """
nodes:
  pve1:
    kind: pve-host
    os: debian-12
    connection: {address: pve1.example}
    pve: {pci_mappings: [{name: a6000, addresses: ["0000:41:00.0"]}]}
  vm1:
    kind: pve-guest
    connection: {address: vm1.example}
    vm:
      pve_node: pve1
      vmid: 201
      template_vmid: 9000
"""
