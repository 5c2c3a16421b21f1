"""Reading a batch's input: the OpenAI JSONL file line by line, and metadata."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from shared.core.errors import ErrorCode, InvalidRequest
from shared.core.storable import find_unstorable

ENDPOINT = "/v1/images/generations"
EDITS_ENDPOINT = "/v1/images/edits"
ENDPOINTS = (ENDPOINT, EDITS_ENDPOINT)


MAX_LINES = 50_000


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
        return ErrorCode.duplicate_custom_id, f"The custom_id '{custom_id}' is used twice."
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


def parse_input(
    lines: Iterable[bytes], endpoint: str = ENDPOINT
) -> tuple[list[dict[str, Any]], list[LineError]]:
    """Items from an OpenAI batch input file read line by line (never decoded whole),
    or the errors naming every bad line."""
    items: list[dict[str, Any]] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    for number, raw_bytes in enumerate(lines, start=1):
        obj, found = _line_errors(number, raw_bytes, seen, endpoint)
        errors += found
        if obj is not None:
            items.append(
                {"line": number, "custom_id": obj.get("custom_id"), "body": obj.get("body")}
            )
    if len(items) > MAX_LINES:
        errors.insert(
            0,
            {
                "code": ErrorCode.too_many_lines,
                "line": None,
                "param": None,
                "message": f"The file has {len(items)} requests; at most {MAX_LINES} are allowed.",
            },
        )
    if not items and not errors:
        errors.append(
            {
                "code": ErrorCode.empty_file,
                "line": None,
                "param": None,
                "message": "The input file has no requests.",
            }
        )
    return items, errors
