"""The two front ends over one model: pyinfra (operations) and Ansible (action plugins
and roles), each a thin adapter over gpunode.core."""
