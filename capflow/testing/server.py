"""A small, fast, real HTTP server speaking the OpenAI chat-completions protocol (and its Batch
and Files APIs: see :mod:`capflow.testing.batch_api`).

Answers are deterministic captions derived from the images in the request (see
:func:`describe_image`), so tests can compute the expected caption themselves.
Run in-process (``with FakeOpenAIServer() as server: ...``) or as a process
(``python -m capflow.testing.server --port 0``). It only binds 127.0.0.1.

This module is the server's public face: its parts live in modules of their own, and are
imported from here by tests and plugins alike.
"""

from __future__ import annotations

import sys

from capflow.testing.api_errors import error_response
from capflow.testing.batch_api import BATCH_SETTINGS, SubmittedBatch, parse_batch_file
from capflow.testing.chat_reply import TOKENS_PER_IMAGE
from capflow.testing.chat_request import RecordedRequest
from capflow.testing.fake_answers import asked_schema, fake_object
from capflow.testing.fake_openai import DEFAULT_MODEL, HOST, FakeOpenAIServer
from capflow.testing.faults import (
    FAULT_KINDS,
    FaultConfig,
    FaultInjector,
    add_fault_arguments,
    apply_fault,
    config_from_args,
)
from capflow.testing.image_descriptions import describe_image
from capflow.testing.server_command import main

__all__ = [
    "BATCH_SETTINGS",
    "DEFAULT_MODEL",
    "FAULT_KINDS",
    "HOST",
    "TOKENS_PER_IMAGE",
    "FakeOpenAIServer",
    "FaultConfig",
    "FaultInjector",
    "RecordedRequest",
    "SubmittedBatch",
    "add_fault_arguments",
    "apply_fault",
    "asked_schema",
    "config_from_args",
    "describe_image",
    "error_response",
    "fake_object",
    "main",
    "parse_batch_file",
]

if __name__ == "__main__":
    sys.exit(main())
