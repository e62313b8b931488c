"""pyinfra inventory for a gpunode site: `pyinfra inventory/pyinfra_inventory.py deploy/gpu_node.py`.

The site file comes from $GPUNODE_SITE, else inventory/site.yaml. Every host's data
carries `node`, its fully resolved profile; groups are the site's groups. Only the
nodes named in $GPUNODE_LIMIT (comma-separated) are listed when it is set."""

import os
import sys

from gpunode.core.lock import locked_site
from gpunode.inventory import SiteError, load_site, to_pyinfra

try:
    _groups = to_pyinfra(locked_site(load_site()))  # <site>.lock applied
except SiteError as _exc:
    print("\n".join(_exc.lines), file=sys.stderr)
    raise SystemExit(2) from None

_limit = {n for n in os.environ.get("GPUNODE_LIMIT", "").split(",") if n}
for _name, _hosts in _groups.items():
    _kept = [(h, d) for h, d in _hosts if not _limit or h in _limit]
    if _kept and _name != "ungrouped":
        globals()[_name] = _kept
ungrouped = [(h, d) for h, d in _groups["ungrouped"] if not _limit or h in _limit]
