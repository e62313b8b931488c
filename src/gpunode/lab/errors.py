"""Errors raised by the lab. Each message says what is wrong, where, and what to do."""

from __future__ import annotations


class LabError(RuntimeError):
    """A lab operation failed; the message is meant for a user (no traceback needed)."""


class LabInputError(LabError):
    """Bad input (unknown VM, invalid name or size): nothing was touched. CLI exit code 2."""
