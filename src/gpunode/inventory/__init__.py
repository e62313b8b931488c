"""Loading, merging and validating site files; engine adapters."""

from gpunode.inventory.adapters import to_ansible, to_pyinfra
from gpunode.inventory.loader import Site, SiteError, load_site, merge, resolve_site_path

__all__ = ["Site", "SiteError", "load_site", "merge", "resolve_site_path", "to_ansible",
           "to_pyinfra"]
