"""Cut OpenAI's published OpenAPI document down to its three Images API operations.

    git clone https://github.com/openai/openai-openapi /tmp/openai-openapi
    python scripts/openai_images_schema.py /tmp/openai-openapi/openapi.yaml \\
        "$(git -C /tmp/openai-openapi rev-parse HEAD)" > tests/support/openai_images.yaml

The output keeps ``openapi``, ``info``, ``servers``, the security scheme, the
``Images`` tag, the operations POST /images/generations, /images/edits and
/images/variations exactly as published, and every component they reference
(followed to the end), so it loads on its own; a header names the source commit.
tests/e2e/test_openai_schema.py validates our answers against it
(docs/openai-schema.md).
"""

from __future__ import annotations

import copy
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

OPS = ("/images/generations", "/images/edits", "/images/variations")


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def images_only(source: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "openapi": source["openapi"],
        "info": copy.deepcopy(source["info"]),
        "servers": copy.deepcopy(source["servers"]),
        "security": copy.deepcopy(source.get("security", [])),
        "tags": [tag for tag in source.get("tags", []) if tag.get("name") == "Images"],
        "paths": {path: {"post": copy.deepcopy(source["paths"][path]["post"])} for path in OPS},
    }
    components: dict[str, dict[str, Any]] = {}
    schemes = {name for requirement in out["security"] for name in requirement}
    if schemes:
        every = source["components"]["securitySchemes"]
        components["securitySchemes"] = {name: copy.deepcopy(every[name]) for name in schemes}
    seen: set[str] = set()
    todo = list(_refs(out["paths"]))
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, section, name = ref.removeprefix("#/").split("/")  # #/components/SECTION/NAME
        target = source["components"][section][name]
        components.setdefault(section, {})[name] = copy.deepcopy(target)
        todo.extend(_refs(target))
    out["components"] = {
        section: dict(sorted(entries.items())) for section, entries in sorted(components.items())
    }
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    raw = Path(argv[0]).read_bytes()
    document = images_only(yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    print(
        "# OpenAI's Images API operations, cut from openai/openai-openapi's openapi.yaml\n"
        f"# at commit {argv[1]} (sha256 {hashlib.sha256(raw).hexdigest()})\n"
        "# by scripts/openai_images_schema.py; refresh as docs/openai-schema.md says.\n"
        + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100),
        end="",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
