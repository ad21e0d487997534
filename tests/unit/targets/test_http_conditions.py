"""What the HTTP target sends for a write's conditions, and how it reads 412."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from targets.http import classify_response, condition_headers


@pytest.mark.parametrize(
    ("conditions", "if_match"),
    [
        ({"etag": "abc"}, '"abc"'),
        ({"etag": '"abc"'}, '"abc"'),
        ({"etag": 'W/"abc"'}, 'W/"abc"'),
        ({"etag": "*"}, "*"),  # any current representation
        ({"etag": "abc", "version": 3}, '"abc"'),  # etag first
        ({"etag": None, "version": 3}, '"3"'),
        ({"version": "r-12"}, '"r-12"'),
        ({"version": 1.5}, '"1.5"'),
        ({"state": "open"}, None),
    ],
)
def test_if_match_from_etag_or_version(conditions: dict[str, Any], if_match: str | None) -> None:
    headers = condition_headers(conditions)
    assert headers.get("If-Match") == if_match
    assert headers["WAL-Conditions"] == orjson.dumps(conditions).decode()


def test_wal_conditions_is_compact_ascii_json() -> None:
    conditions = {"who": "Zoë 😀", "n": [1, None], "s": 'q"\n'}
    text = condition_headers(conditions)["WAL-Conditions"]
    assert text == '{"who":"Zo\\u00eb \\ud83d\\ude00","n":[1,null],"s":"q\\"\\n"}'
    assert text.isascii() and text.isprintable()
    assert orjson.loads(text) == conditions


@pytest.mark.parametrize(
    ("conditions", "fault"),
    [
        ({"etag": 5}, "condition 'etag' must be a non-empty string"),
        ({"etag": ""}, "condition 'etag' must be a non-empty string"),
        ({"version": True}, "condition 'version' must be a string or a number"),
        ({"version": [1]}, "condition 'version' must be a string or a number"),
        ({"etag": "a\r\nX-Injected: 1"}, "condition 'etag' is not a usable entity tag"),
        ({"version": "é"}, "condition 'version' is not a usable entity tag"),
        ({"version": "x" * 2000}, "condition 'version' is not a usable entity tag"),
        ({"at": {1, 2}}, "conditions are not JSON"),
    ],
)
def test_conditions_that_cannot_be_sent(conditions: dict[str, Any], fault: str) -> None:
    with pytest.raises(ValueError, match=fault):
        condition_headers(conditions)


def test_412_is_condition_failed_only_for_a_conditional_write() -> None:
    failed = classify_response(412, "Precondition Failed", "5", conditional=True)
    assert (failed.status, failed.code) == ("permanent", "CONDITION_FAILED")
    assert (failed.message, failed.retry_after) == ("HTTP 412 Precondition Failed", None)
    plain = classify_response(412, "Precondition Failed")
    assert (plain.status, plain.code) == ("permanent", "TARGET_REJECTED")
    assert classify_response(409, "Conflict", conditional=True).code == "TARGET_REJECTED"
    assert classify_response(503, "", conditional=True).code == "TARGET_ERROR"
    assert classify_response(204, "", conditional=True).ok
