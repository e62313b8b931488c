"""The `gpunode` command: main (the verbs), deploy, check, lock, and their output."""
