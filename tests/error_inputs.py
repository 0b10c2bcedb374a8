"""The error-input tables of `tests/test_error_inputs_*.py`, in the manner of PyTorch's OpInfo `error_inputs`.

Each surface lists bad inputs as rows: an [`ErrorInput`] says which exception (or HTTP status, or exit code) the
input must give and a regular expression its message must match; a [`SkipInput`] says the input is a counted skip
(the reason it is counted under). `rows(table)` turns a table into `pytest.param`s, one test case per row, named by
the row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class ErrorInput:
    """`input` must fail with `error` (an exception type, an HTTP status or an exit code) and a message matching
    `match` (a regular expression searched in the message, case-insensitive)."""

    name: str
    input: Any
    error: type[BaseException] | int
    match: str


@dataclass(frozen=True)
class SkipInput:
    """`input` must be skipped and counted under `reason`, the rest going on."""

    name: str
    input: Any
    reason: str


def rows(table: list[ErrorInput | SkipInput]) -> list:
    """The table's rows as `pytest.param`s with the row names as ids (names must be unique)."""
    names = [row.name for row in table]
    assert len(names) == len(set(names)), f"duplicate row names in {names}"
    return [pytest.param(row, id=row.name) for row in table]


def assert_message(row: ErrorInput, message: str) -> None:
    assert re.search(row.match, message, re.IGNORECASE), f"{row.name}: {row.match!r} not in {message!r}"
