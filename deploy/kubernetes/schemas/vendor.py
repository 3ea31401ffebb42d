#!/usr/bin/env python3
"""Makes the vendored Kubernetes API schemas in this directory.

Source: the JSON schemas generated from Kubernetes' OpenAPI specification
(the kubernetes-json-schema "local-strict" flavour: unknown fields are
errors), as the PyPI package kubernetes-validate ships them. For each kind
the manifests use, one self-contained file: the kind's schema plus only the
definitions it reaches, references rewritten to "#/$defs/...", the
"description" texts dropped (they do not validate anything and are most of
the bytes). Run again to follow another Kubernetes version:

    pip install --target /tmp/kv kubernetes-validate
    python3 vendor.py /tmp/kv/kubernetes_validate/kubernetes-json-schema v1.30.0
"""

import json
import pathlib
import sys

KINDS = ["namespace-v1", "serviceaccount-v1", "configmap-v1", "daemonset-apps-v1"]
PREFIX = "/api/_definitions.json#/$defs/"


def strip(node, seen):
    """Drops descriptions, rewrites references and collects their targets."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                continue
            if key == "$ref" and isinstance(value, str):
                name = None
                for prefix in (PREFIX, "#/$defs/"):
                    if value.startswith(prefix):
                        name = value[len(prefix):]
                if name is None:
                    raise SystemExit(f"unexpected reference {value}")
                seen.add(name)
                out[key] = "#/$defs/" + name
                continue
            out[key] = strip(value, seen)
        return out
    if isinstance(node, list):
        return [strip(v, seen) for v in node]
    return node


def main():
    root = pathlib.Path(sys.argv[1]) / f"{sys.argv[2]}-local-strict"
    defs = json.loads((root / "_definitions.json").read_text())["$defs"]
    here = pathlib.Path(__file__).resolve().parent
    for kind in KINDS:
        seen = set()
        schema = strip(json.loads((root / f"{kind}.json").read_text()), seen)
        collected, todo = {}, sorted(seen)
        while todo:
            name = todo.pop()
            if name in collected:
                continue
            more = set()
            collected[name] = strip(defs[name], more)
            todo.extend(sorted(more - collected.keys()))
        schema["$defs"] = dict(sorted(collected.items()))
        schema["$comment"] = f"Kubernetes {sys.argv[2]} ({kind}); made by vendor.py, see README.md"
        (here / f"{kind}.json").write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


main()
