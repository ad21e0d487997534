"""COPY text encoding of rows-mode batches (what PostgreSQL's COPY … FROM STDIN parses)."""

from __future__ import annotations

from typing import Any

import pytest

from targets.sql_copy import Kind, copy_columns, copy_rows

KINDS: dict[str, Kind] = {"v": "value", "j": "json", "a": "array"}


def encoded(*rows: dict[str, Any]) -> list[bytes]:
    return copy_rows(rows, ["v", "j", "a"], KINDS).split(b"\n")[:-1]


def test_clean_values_go_as_their_text() -> None:
    rows = encoded(
        {"v": "text ∑", "j": {"k": [1, None]}, "a": ["x y", 'q"', None, 2]},
        {"v": 42, "j": None, "a": None},
        {"v": 1.5, "j": "s", "a": "{1,2}"},
        {"v": True, "j": False, "a": [True, [1.5]]},
        {"v": None, "j": 7, "a": []},
    )
    assert rows == [
        'text ∑\t{"k":[1,null]}\t{"x y","q\\\\"",NULL,2}'.encode(),  # backslash doubled
        b"42\tnull\t\\N",  # None: JSON null in a json column, NULL elsewhere
        b'1.5\t"s"\t{1,2}',
        b"true\tfalse\t{true,{1.5}}",
        b"\\N\t7\t{}",
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("tab\there", b"tab\\there"),
        ("new\nline", b"new\\nline"),
        ("c\rr", b"c\\rr"),
        ("back\\slash", b"back\\\\slash"),
        ("\\N", b"\\\\N"),  # the text, not NULL
    ],
)
def test_a_value_that_needs_escaping_is_escaped_and_the_rest_as_before(
    value: str, text: bytes
) -> None:
    rows = encoded(
        {"v": None, "j": {"k": "a\\b\tc"}, "a": ["a\\b"]},
        {"v": value, "j": None, "a": None},
    )
    clean = b'\\N\t{"k":"a\\\\\\\\b\\\\tc"}\t{"a\\\\\\\\b"}'  # JSON's and arrays' escapes, doubled
    assert rows == [clean, text + b"\tnull\t\\N"]


def test_columns_given_one_by_one() -> None:
    data = copy_columns([["ns", "n\ts"], ["t", "t"], ["1", "2"]], ("value", "value", "value"))
    assert data == b"ns\tt\t1\nn\\ts\tt\t2\n"
