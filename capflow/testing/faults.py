"""Deterministic fault injection for the fake OpenAI server: which fault a request meets
(:class:`FaultInjector`, seeded so a run is reproducible), what the fault sends instead of the
answer (:func:`apply_fault`), and the command-line options that set the rates."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
from dataclasses import dataclass, fields

from aiohttp import web

from capflow.testing.api_errors import error_response

#: Fault kinds, in the order their probability bands are laid out on [0, 1).
FAULT_KINDS: tuple[str, ...] = (
    "429",
    "500",
    "502",
    "503",
    "hang",
    "malformed",
    "empty_choices",
    "reset",
    "bad_json",
)

#: Body of the "malformed" fault: truncated JSON, sent with status 200.
MALFORMED_BODY = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choi'


@dataclass(frozen=True)
class FaultConfig:
    """Per-request probabilities of each fault kind (their sum must be <= 1).

    ``seed`` makes the sequence of injected faults reproducible for a given
    request arrival order; ``retry_after`` is the ``Retry-After`` value sent
    with 429s and ``hang_seconds`` how long a "hang" stalls before answering.
    """

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_502: float = 0.0
    rate_503: float = 0.0
    rate_hang: float = 0.0
    rate_malformed: float = 0.0
    rate_empty_choices: float = 0.0
    rate_bad_json: float = 0.0  # a structured answer cut short: not JSON, or not the schema's
    rate_reset: float = 0.0
    retry_after: float = 1.0
    hang_seconds: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = self.rates()
        if any(r < 0 or r > 1 for r in rates.values()):
            raise ValueError("fault rates must be within [0, 1]")
        if sum(rates.values()) > 1 + 1e-9:
            raise ValueError("fault rates must sum to at most 1")

    def rates(self) -> dict[str, float]:
        """Return ``{kind: rate}`` for every kind in :data:`FAULT_KINDS`."""
        return {kind: getattr(self, f"rate_{kind}") for kind in FAULT_KINDS}


class FaultInjector:
    """Draws at most one fault per request from a seeded RNG."""

    def __init__(self, config: FaultConfig | None) -> None:
        self.config = config or FaultConfig()
        self.reset()

    def reset(self) -> None:
        """Re-seed so the fault sequence starts over."""
        self._rng = random.Random(self.config.seed)

    def draw(self) -> str | None:
        """Return the fault kind for the next request, or None."""
        rates = self.config.rates()
        if not any(rates.values()):
            return None  # keep the RNG untouched when faults are off
        x = self._rng.random()
        edge = 0.0
        for kind, rate in rates.items():
            edge += rate
            if x < edge:
                return kind
        return None


async def apply_fault(
    kind: str | None, config: FaultConfig, request: web.Request
) -> web.StreamResponse | None:
    """Enact fault ``kind``: return the response to send instead of a normal answer,
    or None to answer normally (after stalling, for "hang"; "empty_choices" and "bad_json"
    are left to the caller since they shape the answer)."""
    if kind == "429":
        return error_response(
            429,
            "Rate limit reached (injected fault)",
            "rate_limit_exceeded",
            "requests",
            {"Retry-After": f"{config.retry_after:g}"},
        )
    if kind in ("500", "502", "503"):
        return error_response(int(kind), f"Injected server error {kind}", None, "server_error")
    if kind == "malformed":
        return web.Response(body=MALFORMED_BODY, content_type="application/json")
    if kind == "reset":
        reset_connection(request)
        # connection_lost cancels this handler (handler_cancellation=True) almost at once.
        await asyncio.sleep(60)
    if kind == "hang":
        await asyncio.sleep(config.hang_seconds)
    return None


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--fault-KIND RATE``, ``--retry-after``, ``--hang-seconds`` and ``--seed``."""
    for kind in FAULT_KINDS:
        parser.add_argument(
            f"--fault-{kind.replace('_', '-')}",
            dest=f"rate_{kind}",
            type=float,
            default=0.0,
            metavar="RATE",
            help=f"probability of a '{kind}' fault",
        )
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of 429s")
    parser.add_argument("--hang-seconds", type=float, default=30.0, help="stall of a 'hang'")
    parser.add_argument("--seed", type=int, default=0, help="seed for fault injection")


def config_from_args(args: argparse.Namespace) -> FaultConfig:
    """Build a :class:`FaultConfig` from arguments added by :func:`add_fault_arguments`."""
    return FaultConfig(**{f.name: getattr(args, f.name) for f in fields(FaultConfig)})


def reset_connection(request: web.Request) -> None:
    """Abort the client connection with a TCP RST instead of a clean FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Zero linger turns close() into an RST, i.e. ECONNRESET for the client.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
