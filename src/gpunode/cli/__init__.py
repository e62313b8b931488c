"""The `gpunode` command: main (the verbs), deploy, check, lock, and their output; here what
every verb's module shares (the --site option, the input-error exit)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

SiteOpt = Annotated[str | None, typer.Option("--site", help="Site file (else $GPUNODE_SITE, "
                                              "else inventory/site.yaml).")]


def fail_input(lines: list[str]) -> typer.Exit:
    """Bad input: one line per problem on stderr, and exit code 2."""
    for line in lines:
        print(line, file=sys.stderr)
    return typer.Exit(2)
