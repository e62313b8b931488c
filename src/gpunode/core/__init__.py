"""The engine-neutral core: what a node should be (desired, files, render), the host paths
and commands, the plan that decides what must happen on a host, locks and manifests."""
