"""Reading a batch's input: the OpenAI JSONL file line by line, and metadata."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from shared.core.errors import ErrorCode, InvalidRequest, quoted
from shared.core.storable import find_unstorable
from shared.files.service import MAX_FILE_BYTES

ENDPOINT = "/v1/images/generations"
EDITS_ENDPOINT = "/v1/images/edits"
ENDPOINTS = (ENDPOINT, EDITS_ENDPOINT)


MAX_LINES = 50_000
# Line errors listed in a failed batch's errors; any more are only counted.
MAX_LISTED_ERRORS = 100


MAX_CUSTOM_ID_CHARS = 500  # the column


def check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in metadata.items()):
        raise InvalidRequest(
            "metadata holds at most 16 keys (64 characters) with values of at most 512 characters.",
            param="metadata",
        )


LineError = dict[str, Any]


def _custom_id_refusal(custom_id: Any, seen: set[str]) -> tuple[ErrorCode, str] | None:
    """Why a line's custom_id is refused (its code and message), or None (then it
    is remembered, so a second use is refused)."""
    if not isinstance(custom_id, str) or not custom_id:
        return ErrorCode.missing_required_parameter, "custom_id must be a non-empty string."
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return (
            ErrorCode.invalid_value,
            f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters.",
        )
    if custom_id in seen:
        return ErrorCode.duplicate_custom_id, f"The custom_id '{quoted(custom_id)}' is used twice."
    seen.add(custom_id)
    return None


def _line_errors(
    number: int, raw_bytes: bytes, seen: set[str], endpoint: str
) -> tuple[dict[str, Any] | None, list[LineError]]:
    """One line: its request object (None for a blank line or one that is not an
    object), and every error found in it."""
    errors: list[LineError] = []

    def bad(code: str, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "line": number, "message": message, "param": param})

    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        bad(ErrorCode.invalid_file, f"Line {number} is not UTF-8 text.")
        return None, errors
    if not raw.strip():
        return None, errors
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        bad(ErrorCode.invalid_json_line, f"Line {number} is not valid JSON: {exc}.")
        return None, errors
    if not isinstance(obj, dict):
        bad(ErrorCode.invalid_request, f"Line {number} is not a JSON object.")
        return None, errors
    unfit = find_unstorable(obj)
    if unfit:
        bad(
            ErrorCode.invalid_value,
            f"Line {number}: '{unfit[0]}' contains {unfit[1]}, which is not allowed.",
            unfit[0],
        )
    refused = _custom_id_refusal(obj.get("custom_id"), seen)
    if refused:
        bad(*refused, "custom_id")
    if obj.get("method") != "POST":
        bad(ErrorCode.invalid_method, "method must be 'POST'.", "method")
    if obj.get("url") != endpoint:
        bad(ErrorCode.invalid_url, f"url must be '{endpoint}', the batch's endpoint.", "url")
    if not isinstance(obj.get("body"), dict):
        bad(ErrorCode.invalid_body, "body must be a JSON object.", "body")
    return obj, errors


def _file_error(code: ErrorCode, message: str) -> LineError:
    """An error of the file as a whole (no line, no param), in a line error's shape."""
    return {"code": code, "line": None, "param": None, "message": message}


def parse_input(
    lines: Iterable[bytes],
    endpoint: str = ENDPOINT,
    *,
    max_lines: int = MAX_LINES,
    max_bytes: int = MAX_FILE_BYTES,
) -> tuple[list[dict[str, Any]], list[LineError]]:
    """Items from an OpenAI batch input file read line by line (never decoded whole),
    or the errors naming its bad lines (then no items).

    Streamed, so a hostile file costs memory bounded by the limits, not by its size:
    reading stops at the first request past ``max_lines`` (``too_many_lines``) or
    the first line past ``max_bytes`` (``file_too_large``); the first
    ``MAX_LISTED_ERRORS`` line errors are kept, the rest only counted (one last
    error says how many more); and once a line is bad no item is kept.
    """
    items: list[dict[str, Any]] = []
    errors: list[LineError] = []
    unlisted = 0
    seen: set[str] = set()
    requests = read = 0
    missing_newline = 0  # a line yielded without its newline (S3's iter_lines)
    limit: LineError | None = None
    for number, raw_bytes in enumerate(lines, start=1):
        read += missing_newline + len(raw_bytes)
        missing_newline = 0 if raw_bytes.endswith(b"\n") else 1
        if read > max_bytes:
            limit = _file_error(
                ErrorCode.file_too_large,
                f"The file is more than {max_bytes} bytes; the limit is {max_bytes}.",
            )
            break
        if not raw_bytes.strip():
            continue
        requests += 1
        if requests > max_lines:
            limit = _file_error(
                ErrorCode.too_many_lines,
                f"The file has more than {max_lines} requests; at most {max_lines} are allowed.",
            )
            break
        obj, found = _line_errors(number, raw_bytes, seen, endpoint)
        if found:
            room = MAX_LISTED_ERRORS - len(errors)
            errors += found[:room]
            unlisted += len(found[room:])
            items.clear()  # the batch fails: its items are never used
        elif obj is not None and not errors:
            items.append(
                {"line": number, "custom_id": obj.get("custom_id"), "body": obj.get("body")}
            )
    if unlisted:
        errors.append(
            _file_error(
                ErrorCode.invalid_file,
                f"{unlisted} more errors were found on later lines; "
                f"only the first {MAX_LISTED_ERRORS} are listed.",
            )
        )
    if limit is not None:
        errors.insert(0, limit)
        items.clear()
    if not items and not errors:
        errors.append(_file_error(ErrorCode.empty_file, "The input file has no requests."))
    return items, errors
