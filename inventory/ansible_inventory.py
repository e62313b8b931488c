#!/usr/bin/env python3
"""Ansible dynamic inventory for a gpunode site (`ansible-inventory --list`).

The site file comes from $GPUNODE_SITE, else inventory/site.yaml. Each host's
`node` hostvar is its fully resolved profile; groups are the site's groups."""

import json
import sys

from gpunode.core.lock import locked_site
from gpunode.inventory import SiteError, load_site, to_ansible


def main(argv: list[str]) -> int:
    try:
        inventory = to_ansible(locked_site(load_site()))  # <site>.lock applied
    except SiteError as exc:
        print("\n".join(exc.lines), file=sys.stderr)
        return 2
    if "--host" in argv:
        host = argv[argv.index("--host") + 1]
        print(json.dumps(inventory["_meta"]["hostvars"].get(host, {})))
    else:
        print(json.dumps(inventory, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
