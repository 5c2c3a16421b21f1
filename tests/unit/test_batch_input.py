"""The batch input parser: every bad line named with its code, good lines kept."""

from __future__ import annotations

import itertools
import json
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared.batches.input import MAX_CUSTOM_ID_CHARS, MAX_LINES, MAX_LISTED_ERRORS, parse_input
from shared.core.storage import LocalStorage
from shared.files.service import MAX_FILE_BYTES


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


# --- hostile input costs memory bounded by the limits (issue 24) ----------------------


def guarded(lines: Iterable[bytes], most: int, pulled: list[int]) -> Iterator[bytes]:
    """The lines, counting those pulled in pulled[0]; reading past ``most`` fails the
    test at once (a parser that reads the whole file would otherwise run on)."""
    for raw in lines:
        pulled[0] += 1
        assert pulled[0] <= most, f"read past line {most}: the limit is not enforced while reading"
        yield raw


def test_three_million_empty_objects_stop_at_the_line_limit_in_bounded_memory(
    tmp_path: Path,
) -> None:
    # 3,000,000 lines of {} (9 MB): before, every item and every error (four a line)
    # was collected before the line count was checked: GiBs and tens of seconds.
    storage = LocalStorage(tmp_path, "secret")
    storage.put("hostile.jsonl", b"{}\n" * 3_000_000, "application/jsonl")
    pulled = [0]
    # The bound: what is kept is at most MAX_LISTED_ERRORS errors (~20 KB measured)
    # and the line being read; 10 MiB leaves room for the file's read buffer and the
    # interpreter, and is far below the 3,000,000 lines' own bytes objects (~100 MB),
    # let alone their 12,000,000 errors (a 3,140 MiB peak before).
    bound = 10 * 2**20
    tracemalloc.start()
    try:
        start = time.perf_counter()
        items, errors = parse_input(guarded(storage.lines("hostile.jsonl"), MAX_LINES + 1, pulled))
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pulled[0] == MAX_LINES + 1  # stopped at the first request past the limit
    assert items == []
    assert errors[0] == {
        "code": "too_many_lines",
        "line": None,
        "param": None,
        "message": f"The file has more than {MAX_LINES} requests; at most {MAX_LINES} are allowed.",
    }
    assert len(errors) == 1 + MAX_LISTED_ERRORS + 1
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB"
    # About a second with tracemalloc on (0.2 s off; 20 s before, 130 s traced); 10 s
    # only catches a parser that reads on, without failing on a loaded machine.
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_past_the_first_hundred_errors_are_only_counted() -> None:
    pulled = [0]
    items, errors = parse_input(guarded([b"{not json"] * 5000, 5000, pulled))
    assert items == []
    assert pulled[0] == 5000
    assert len(errors) == MAX_LISTED_ERRORS + 1
    assert [(e["line"], e["code"]) for e in errors[:-1]] == [
        (n, "invalid_json_line") for n in range(1, MAX_LISTED_ERRORS + 1)
    ]
    assert errors[-1] == {
        "code": "invalid_file",
        "line": None,
        "param": None,
        "message": f"4900 more errors were found on later lines; "
        f"only the first {MAX_LISTED_ERRORS} are listed.",
    }


def test_a_bad_line_among_good_ones_keeps_no_items() -> None:
    items, errors = parse_input([line("a"), b"{not json", line("b")])
    assert items == []
    assert [(e["line"], e["code"]) for e in errors] == [(2, "invalid_json_line")]


def test_the_byte_limit_stops_reading_an_endless_file() -> None:
    # Blank 1 MiB lines: parsing costs nothing, so only the byte limit stops them.
    blank = b" " * (2**20 - 1) + b"\n"
    pulled = [0]
    fits = MAX_FILE_BYTES // len(blank)
    items, errors = parse_input(guarded(itertools.repeat(blank), fits + 1, pulled))
    assert pulled[0] == fits + 1  # stopped at the first line past the limit
    assert items == []
    assert errors == [
        {
            "code": "file_too_large",
            "line": None,
            "param": None,
            "message": f"The file is more than {MAX_FILE_BYTES} bytes; "
            f"the limit is {MAX_FILE_BYTES}.",
        }
    ]


def test_lines_read_without_their_newline_count_it() -> None:
    # S3's iter_lines strips each newline: two such lines are their bytes and one
    # newline between them; a third line goes past that.
    ok = line("a"), line("b")
    size = sum(len(raw) for raw in ok) + 1
    items, errors = parse_input(ok, max_bytes=size)
    assert errors == []
    assert len(items) == 2
    items, errors = parse_input([*ok, b"\n"], max_bytes=size)
    assert items == []
    assert [e["code"] for e in errors] == ["file_too_large"]


def test_the_line_limit_counts_requests_not_blank_lines() -> None:
    items, errors = parse_input([line("a"), b"", line("b"), b"  "], max_lines=2)
    assert errors == []
    assert len(items) == 2
    items, errors = parse_input([line("a"), line("b"), b"{not json"], max_lines=2)
    assert items == []
    assert [e["code"] for e in errors] == ["too_many_lines"]
