"""The batch input parser: every bad line named with its code, good lines kept."""

from __future__ import annotations

import json

from shared.batches.input import MAX_CUSTOM_ID_CHARS, parse_input


def line(custom_id: object = "a", **overrides: object) -> bytes:
    obj: dict[str, object] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/images/generations",
        "body": {"prompt": "p"},
    }
    obj.update(overrides)
    return json.dumps(obj).encode()


def test_good_lines_become_items_in_order_and_blank_lines_are_skipped() -> None:
    items, errors = parse_input([line("a"), b"   ", line("b")])
    assert errors == []
    assert [(i["line"], i["custom_id"]) for i in items] == [(1, "a"), (3, "b")]
    assert items[0]["body"] == {"prompt": "p"}


def test_every_bad_line_is_named_with_its_code_and_param() -> None:
    _, errors = parse_input(
        [
            b"\xff\xfe",
            b"{not json",
            b"[1, 2]",
            line("dup"),
            line("dup"),
            line("", method="GET"),
            line("u", url="/v1/chat/completions"),
            line("b", body="text"),
            line("x" * (MAX_CUSTOM_ID_CHARS + 1)),
            line("nul\u0000"),
        ]
    )
    found = {(e["line"], e["code"], e["param"]) for e in errors}
    assert found == {
        (1, "invalid_file", None),
        (2, "invalid_json_line", None),
        (3, "invalid_request", None),
        (5, "duplicate_custom_id", "custom_id"),
        (6, "missing_required_parameter", "custom_id"),
        (6, "invalid_method", "method"),
        (7, "invalid_url", "url"),
        (8, "invalid_body", "body"),
        (9, "invalid_value", "custom_id"),
        (10, "invalid_value", "custom_id"),
    }


def test_an_empty_file_is_one_error() -> None:
    items, errors = parse_input([b"", b"\n"])
    assert items == []
    assert [e["code"] for e in errors] == ["empty_file"]
