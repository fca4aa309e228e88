"""Running an asyncio server in a background thread, so a synchronous test can use it in a
``with`` block while the code under test talks to it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

_Server = TypeVar("_Server", bound="BackgroundServer")


class BackgroundServer:
    """Runs :meth:`serve` on its own event loop in a daemon thread: :meth:`start` returns once
    it listens, :meth:`stop` ends it; or use it as a context manager.

    Subclasses implement :meth:`serve` and may name themselves with ``thread_name`` and
    ``description`` (in the error when the server cannot start).
    """

    thread_name = "capflow-background-server"
    description = "server"

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._startup_error: BaseException | None = None

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Listen until ``stop`` is set, calling ``on_ready`` once listening."""
        raise NotImplementedError

    def start(self: _Server) -> _Server:
        """Serve from a background thread; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        ready = threading.Event()
        self._startup_error = None
        self._thread = threading.Thread(target=self._thread_main, args=(ready,),
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"{self.description} failed to start") from self._startup_error
        return self

    def _thread_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        try:
            loop.run_until_complete(self.serve(self._stop_event, ready.set))
        except BaseException as exc:
            self._startup_error = exc
        finally:
            ready.set()  # unblock start() if serve() failed before listening
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            self._loop = None

    def stop(self) -> None:
        """Stop serving, close connections and join the thread."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join()
        self._thread = None

    def __enter__(self: _Server) -> _Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
