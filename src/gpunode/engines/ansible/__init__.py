"""The Ansible engine's Python side: what the action plugins under playbooks/ return
(desired and observed, from gpunode.core) and the roles' generated argument specs."""
