"""Turn a CustomResourceDefinition's openAPIV3Schema into a JSON Schema that
check-jsonschema validates our manifests against (tests/unit/test_deploy.py).

    python deploy/schemas/crd_to_jsonschema.py CRD.yaml OUT.json --source URL

Made stricter than the CRD as the API server reads it, the way ``kubectl apply``
checks it (field validation ``Strict``, kubectl's default): an unknown field in an
object that lists its properties is refused, so a misspelt ``minReplicasCount``
fails here instead of being dropped by the server. ``x-kubernetes-int-or-string``
becomes ``type: [integer, string]``; ``apiVersion`` and ``kind`` are pinned to the
CRD's own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out["type"] = ["integer", "string"]
    open_ended = out.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in out
    if out.get("type") == "object" and "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def convert(crd: dict[str, Any], source: str) -> dict[str, Any]:
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"{kind} {group}/{version['name']} from {source}, by {Path(__file__).name}",
        **schema,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", required=True, help="where the CRD came from (recorded)")
    args = parser.parse_args()
    crd = yaml.safe_load(args.crd.read_text())
    args.out.write_text(json.dumps(convert(crd, args.source), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
