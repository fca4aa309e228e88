"""Structured answers: a JSON Schema that an answer must match.

How the schema is asked for follows what the server supports (``output_mode``):

- ``json_schema``: ``response_format: {"type": "json_schema", ...}`` (OpenAI, vLLM, SGLang,
  llama.cpp's server and most gateways constrain the answer to the schema);
- ``json_object``: ``response_format: {"type": "json_object"}`` (any JSON object);
- ``prompt``: nothing but the prompt, for servers that take neither.

In every mode the system prompt states the schema, so a server that ignores ``response_format``
is still told what to answer. Each answer is parsed (a fenced or prose-wrapped object is found)
and validated with ``jsonschema``; an answer that fails is asked again with the reason, a
bounded number of times, and the row fails with an ``InvalidAnswer`` error that keeps the text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from capflow.answers import AnswerError
from capflow.errors import ConfigError

MODES = ("json_schema", "json_object", "prompt")
_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.S)
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


class InvalidAnswer(AnswerError):
    """An answer that is not a JSON object matching the schema; ``text`` is the answer."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__("InvalidAnswer", message, text)


class OutputSchema:
    """A JSON Schema the answers of a step must match.

    :param schema: the JSON Schema (a dict).
    :param mode: how it is asked for: ``json_schema``, ``json_object`` or ``prompt``.
    :param name: the schema's name in ``response_format`` (letters, digits, ``_`` and ``-``).
    :raises ConfigError: the schema is not a valid JSON Schema, or the mode is unknown.
    """

    def __init__(self, schema: dict[str, Any], mode: str = "json_schema",
                 name: str = "answer") -> None:
        import jsonschema

        if mode not in MODES:
            raise ConfigError(f"output_mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not isinstance(schema, dict):
            raise ConfigError(f"output_schema must be a JSON Schema object, not {schema!r}")
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "its top"
            raise ConfigError(f"output_schema is not a valid JSON Schema at {where}:"
                              f" {exc.message}") from None
        self.schema = schema
        self.mode = mode
        self.name = _NAME.sub("_", name)[:64] or "answer"
        self._validator = cls(schema)
        self._text = json.dumps(schema, ensure_ascii=False, sort_keys=True)

    def describe(self) -> dict[str, Any]:
        """What changes the answers (part of the journal's fingerprint)."""
        return {"schema": self._text, "mode": self.mode, "name": self.name}

    def instruction(self) -> str:
        """What the system prompt adds: the schema, stated."""
        return ("Answer with only a JSON object, no other text, that matches this JSON Schema:\n"
                + self._text)

    def response_format(self) -> dict[str, Any] | None:
        """The request's ``response_format`` for this mode (None: the prompt says it all)."""
        if self.mode == "json_schema":
            return {"type": "json_schema",
                    "json_schema": {"name": self.name, "schema": self.schema, "strict": False}}
        if self.mode == "json_object":
            return {"type": "json_object"}
        return None

    def parse(self, text: str) -> Any:
        """The answer's JSON value, validated; raises ``InvalidAnswer`` saying what is wrong."""
        value = _json_in(text)
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.absolute_path) or "the top level"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise InvalidAnswer(f"the answer does not match the schema at {where}:"
                                f" {_short(first.message)}{more}", text)
        return value

    def reask_turns(self, text: str, error: InvalidAnswer) -> list[dict[str, Any]]:
        """The turns that ask again: the answer as the assistant's, then why it was refused."""
        return [
            {"role": "assistant", "content": text},
            {"role": "user", "content": f"That answer cannot be used: {error}. Answer again"
                                        " with only the JSON object that matches the schema."},
        ]


def _json_in(text: str) -> Any:
    """The JSON value in an answer: the whole text, a fenced block, or the outermost object."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced[1].strip()
    try:
        return json.loads(stripped)
    except ValueError as exc:
        start, end = stripped.find("{"), stripped.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(stripped[start:end + 1])
            except ValueError:
                pass
        raise InvalidAnswer(f"the answer is not JSON: {exc}", text) from None


def _short(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[:limit - 3] + "..."
