"""Tables and text for the CLI that read the same in a terminal, a pipe and a CI log.

In a terminal the tables are rich tables sized to the terminal. When stdout is not a
terminal (piped, redirected, captured by CI), rich would lay tables out at 80 columns and
wrap a long column into one word per line; instead the table becomes plain text, at most
`plain_width()` columns wide (100 unless $COLUMNS says otherwise): fixed columns aligned,
the free-text column wrapped at word boundaries, on its own indented lines when the row
has no room for it. No word is ever split.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from rich.console import Console
from rich.table import Table
from rich.text import Text

PLAIN_WIDTH = 100
#: Below this many columns left for the free-text column, it goes on its own lines.
MIN_INLINE_TEXT = 30


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def plain_width() -> int:
    """Width of plain (not-a-terminal) output: $COLUMNS when set, else 100."""
    try:
        return max(40, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return PLAIN_WIDTH


def console(stderr: bool = False) -> Console:
    """A rich console for messages: terminal width on a terminal, `plain_width()` otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    if is_terminal(stream):
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=plain_width(), soft_wrap=False)


def wrap(text: str, width: int | None = None, indent: str = "",
         subsequent: str | None = None) -> list[str]:
    """Wrap plain text at word boundaries only (a word longer than the line stays whole)."""
    width = width or plain_width()
    out: list[str] = []
    for para in text.splitlines() or [""]:
        out += textwrap.wrap(para, width=width, initial_indent=indent,
                             subsequent_indent=indent if subsequent is None else subsequent,
                             break_long_words=False, break_on_hyphens=False) or [indent.rstrip()]
    return out


def echo(out: Console, text: str, indent: str = "", subsequent: str | None = None) -> None:
    """Print plain text (no markup): wrapped by words when not on a terminal."""
    if is_terminal(out.file):
        out.print(indent + text, highlight=False, markup=False)
        return
    for line in wrap(text, plain_width(), indent, subsequent):
        out.print(line, highlight=False, markup=False, soft_wrap=True)


@dataclass(frozen=True)
class Column:
    name: str
    justify: str = "left"  # "left" | "right"
    #: The free-text column (at most one, the last): wrapped instead of aligned.
    wrap: bool = False


def print_table(out: Console, title: str, columns: Sequence[Column],
                rows: Sequence[Sequence[str] | None]) -> None:
    """Print a table; the title and cells may carry rich markup (plain text drops it).
    A `None` row separates sections."""
    if is_terminal(out.file):
        table = Table(title=title)
        for c in columns:
            table.add_column(c.name, justify="right" if c.justify == "right" else "left")
        for row in rows:
            if row is None:
                table.add_section()
            else:
                table.add_row(*row)
        out.print(table)
        return
    for line in plain_table(title, columns, rows, plain_width()):
        out.print(line, highlight=False, markup=False, soft_wrap=True)


def plain(cell: str) -> str:
    return Text.from_markup(cell).plain


def plain_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str] | None],
                width: int = PLAIN_WIDTH) -> list[str]:
    """The table as plain lines no wider than `width` (unless one word is)."""
    body = [[plain(c) for c in r] for r in rows if r is not None]
    fixed = [i for i, c in enumerate(columns) if not c.wrap]
    free = [i for i, c in enumerate(columns) if c.wrap]
    widths = {i: max([len(columns[i].name)] + [len(r[i]) for r in body]) for i in fixed}
    fixed_total = sum(widths.values()) + 2 * max(len(fixed) - 1, 0)
    lines = wrap(plain(title), width) if title else []
    if fixed_total > width:
        # Too wide even without the free text: one block per row, one field per line.
        label = max(len(c.name) for c in columns)
        for r in body:
            lines.append("")
            for c, cell in zip(columns, r, strict=True):
                lines += wrap(cell, width, f"{c.name:<{label}}  ", " " * (label + 2))
        return lines

    def cells(values: Sequence[str]) -> str:
        parts = []
        for i in fixed:
            v = values[i]
            parts.append(v.rjust(widths[i]) if columns[i].justify == "right"
                         else v.ljust(widths[i]))
        return "  ".join(parts)

    start = fixed_total + 2
    room = width - start
    inline = not free or room >= MIN_INLINE_TEXT
    header = cells([c.name for c in columns])
    if free and inline:
        header += "  " + columns[free[0]].name
    lines.append(header.rstrip())
    lines.append("-" * min(width, max(len(header.rstrip()), fixed_total)))
    for r in body:
        row = cells(r).rstrip()
        text = r[free[0]] if free else ""
        if not text:
            lines.append(row)
        elif inline:
            wrapped = wrap(text, room)
            lines.append((cells(r) + "  " + wrapped[0]).rstrip())
            lines += [" " * start + w for w in wrapped[1:]]
        else:
            lines.append(row)
            lines += wrap(text, width, "    ")
    return lines
