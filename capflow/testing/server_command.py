"""``python -m capflow.testing.server``: the fake OpenAI server as a process of its own, for
tests and benchmarks that run the client elsewhere. It prints ``LISTENING <base_url>`` once it
accepts requests and serves until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from capflow.testing.fake_openai import FakeOpenAIServer
from capflow.testing.faults import add_fault_arguments, config_from_args

_DESCRIPTION = """A small, fast, real HTTP server speaking the OpenAI chat-completions protocol
on 127.0.0.1. Answers are deterministic captions derived from the images in the request (their
size and mean colour)."""


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m capflow.testing.server", description=_DESCRIPTION)
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = pick a free one)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each reply")
    p.add_argument("--api-key-env", metavar="NAME", help="require the API key held in env var NAME")
    p.add_argument("--model", action="extend", nargs="+", default=[], help="accepted model name(s)")
    p.add_argument("--rpm-limit", type=int, help="answer 429 above this many requests a minute,"
                   " counted per one-second window")
    p.add_argument("--slots", type=int, help="answer this many requests at once (each taking"
                   " --latency seconds); the others wait in line")
    p.add_argument("--fail-status", type=int, help="answer every request with this status")
    p.add_argument("--fail-message", default="server failure", help="... and this message")
    p.add_argument("--batch-latency", type=float, default=0.2,
                   help="seconds a Batch API batch waits before answering its lines")
    p.add_argument("--batch-error-rate", type=float, default=0.0, metavar="RATE",
                   help="fraction of batch lines (by custom_id, from --seed) answered with a 500")
    p.add_argument("--batch-error-attempts", type=int, default=1, metavar="N",
                   help="... on their first N runs only")
    add_fault_arguments(p)
    return p


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (an optional speed-up), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: serve until SIGTERM/SIGINT."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"environment variable {args.api_key_env} is not set")
    server = FakeOpenAIServer(latency=args.latency, api_key=api_key, models=args.model or None,
                              faults=config_from_args(args), rpm_limit=args.rpm_limit,
                              slots=args.slots,
                              failure=(args.fail_status, args.fail_message)
                              if args.fail_status else None,
                              port=args.port, batch_latency=args.batch_latency)
    server.set_batch_faults(args.batch_error_rate, attempts=args.batch_error_attempts,
                            seed=args.seed)
    loop = _new_loop()

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.serve(stop, lambda: print(f"LISTENING {server.base_url}", flush=True))

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    return 0
