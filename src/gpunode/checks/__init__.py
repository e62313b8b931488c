"""What the checks expect and how they compare; the testinfra suite itself is checks/ at
the top of the repository (gpunode.cli.check runs it)."""
