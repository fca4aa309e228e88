"""Structured answers of the test server: a request asking for a JSON Schema (through
``response_format`` or its system prompt) is answered with an object of the schema's shape."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

_SCHEMA_IN_PROMPT = re.compile(r"JSON Schema:\s*(\{.*\})", re.S)


def asked_schema(params: dict[str, Any], system: str | None) -> dict[str, Any] | None:
    """The JSON Schema a request (its body fields but the messages, and its system prompt)
    asks its answer to match: ``response_format``'s, else one stated in the system prompt
    (``... JSON Schema: {...}``); ``{}`` for a ``json_object`` request that states none; None
    for a plain answer."""
    fmt = params.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            return schema
    found = _SCHEMA_IN_PROMPT.search(system or "")
    if found:
        with contextlib.suppress(ValueError):
            return json.loads(found[1])
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {}
    return None


def fake_object(schema: dict[str, Any], text: str) -> Any:
    """A value of ``schema``'s shape built from ``text`` (the plain answer): every string is
    ``text``, every array of strings its words, booleans true, numbers its length."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    if kind == "object" or "properties" in schema or not schema:
        props = schema.get("properties") or {"answer": {"type": "string"}}
        return {name: fake_object(sub if isinstance(sub, dict) else {}, text)
                for name, sub in props.items()}
    if kind == "array":
        items = schema.get("items")
        if not isinstance(items, dict):
            items = {}
        if items.get("type", "string") == "string":
            return text.split()
        return [fake_object(items, text)]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return len(text)
    if kind == "null":
        return None
    return text
