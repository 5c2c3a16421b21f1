"""Reading a batch's input: the OpenAI JSONL file line by line, and metadata."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from shared.core.errors import InvalidRequest
from shared.core.storable import find_unstorable

ENDPOINT = "/v1/images/generations"



MAX_LINES = 50_000



MAX_CUSTOM_ID_CHARS = 500  # the column



def check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in metadata.items()):
        raise InvalidRequest("metadata holds at most 16 keys (64 characters) with values of "
                             "at most 512 characters.", param="metadata")



def parse_input(lines: Iterable[bytes]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Items from an OpenAI batch input file read line by line (never decoded whole),
    or the errors naming every bad line."""
    items: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def bad(line: int, code: str, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "line": line, "message": message, "param": param})

    for number, raw_bytes in enumerate(lines, start=1):
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError:
            bad(number, "invalid_file", f"Line {number} is not UTF-8 text.")
            continue
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            bad(number, "invalid_json_line", f"Line {number} is not valid JSON: {exc}.")
            continue
        if not isinstance(obj, dict):
            bad(number, "invalid_request", f"Line {number} is not a JSON object.")
            continue
        custom_id = obj.get("custom_id")
        unfit = find_unstorable(obj)
        if unfit:
            bad(number, "invalid_value", f"Line {number}: '{unfit[0]}' contains {unfit[1]}, "
                "which is not allowed.", unfit[0])
        if not isinstance(custom_id, str) or not custom_id:
            bad(number, "missing_required_parameter", "custom_id must be a non-empty string.",
                "custom_id")
        elif len(custom_id) > MAX_CUSTOM_ID_CHARS:
            bad(number, "invalid_value", f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} "
                "characters.", "custom_id")
        elif custom_id in seen:
            bad(number, "duplicate_custom_id", f"The custom_id '{custom_id}' is used twice.",
                "custom_id")
        else:
            seen.add(custom_id)
        if obj.get("method") != "POST":
            bad(number, "invalid_method", "method must be 'POST'.", "method")
        if obj.get("url") != ENDPOINT:
            bad(number, "invalid_url", f"url must be '{ENDPOINT}', the batch's endpoint.", "url")
        if not isinstance(obj.get("body"), dict):
            bad(number, "invalid_body", "body must be a JSON object.", "body")
        items.append({"line": number, "custom_id": custom_id, "body": obj.get("body")})
    if len(items) > MAX_LINES:
        errors.insert(0, {"code": "too_many_lines", "line": None, "param": None,
                          "message": f"The file has {len(items)} requests; at most "
                                     f"{MAX_LINES} are allowed."})
    if not items and not errors:
        errors.append({"code": "empty_file", "line": None, "param": None,
                       "message": "The input file has no requests."})
    return items, errors
