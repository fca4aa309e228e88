"""Making text from a server (or any other untrusted source) safe to store, log and print.

A hostile or careless server can echo the API key back in an error body, or put terminal
escape sequences in a message. Every piece of server text that capflow stores in a row, logs
or prints goes through :func:`clean_message` (one line, no control characters, no secrets),
and answers go through :func:`redact`.

Secrets are registered once per process (:func:`add_secret`, done by the serving that reads
the key), so that text cleaned anywhere, by any module or plugin, has them removed.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"
_MIN_SECRET = 6  # shorter values would redact ordinary words
# ANSI/VT escape sequences (CSI, OSC, and two-character escapes), then any other C0/C1 control
# character or DEL. Line breaks and tabs become spaces: a message is one line.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST
    r"|\x1b[@-_]"  # other two-character escapes
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[\t\n\r ]+")

_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """Remember ``value`` (an API key) so that :func:`redact` removes it from any text."""
    if value and len(value) >= _MIN_SECRET:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``[redacted]``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def printable(text: str, limit: int | None = 500) -> str:
    """``text`` as one printable line: escape sequences and control characters removed, runs
    of whitespace folded to one space, cut to ``limit`` characters."""
    text = _CONTROLS.sub("", _ESCAPES.sub("", text))
    text = _SPACES.sub(" ", text).strip()
    if limit is not None and len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def clean_message(text: object, limit: int | None = 500) -> str:
    """Untrusted text made fit for an error record, a log line or the terminal."""
    return printable(redact(str(text)), limit)
