"""What the fake OpenAI server has seen: its requests and counters, kept under one lock since
the server's thread writes them while a test's thread reads them."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from capflow.testing.chat_request import RecordedRequest
from capflow.testing.faults import FAULT_KINDS


class RequestLog:
    """Chat-completions requests, in completion order, with counters: totals, in flight (and
    the peak), per status and per fault; and the ids and rate window answers draw on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Forget the requests and counters (the ones in flight still count as such)."""
        with self._lock:
            self._records: list[RecordedRequest] = []
            self._requests_total = self._responses_ok = 0
            self._max_in_flight = self._in_flight
            self._statuses: Counter[int] = Counter()
            self._fault_counts: Counter[str] = Counter()
            self._completion_ids = 0
            self._window: tuple[int, int] = (0, 0)  # (second, requests in it)

    def arrived(self) -> None:
        """Count a request that has come in."""
        with self._lock:
            self._requests_total += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def finished(self, rec: RecordedRequest) -> None:
        """Record a request that has been answered (or abandoned)."""
        with self._lock:
            self._in_flight -= 1
            self._records.append(rec)
            self._statuses[rec.status] += 1
            if rec.fault:
                self._fault_counts[rec.fault] += 1
            # A hang stalls, then answers properly.
            if rec.status == 200 and rec.fault in (None, "hang"):
                self._responses_ok += 1

    def in_second(self, second: int) -> int:
        """Count a request in the one-second window ``second``; the requests in it so far."""
        with self._lock:
            current, count = self._window
            count = count + 1 if second == current else 1
            self._window = (second, count)
        return count

    def next_completion_id(self) -> int:
        """The number of the next completion (1, 2, ...), for its id."""
        with self._lock:
            self._completion_ids += 1
            return self._completion_ids

    def records(self) -> list[RecordedRequest]:
        """Snapshot of the recorded requests, in completion order."""
        with self._lock:
            return list(self._records)

    def timeline(self) -> list[list[float]]:
        """``[[received_at, status], ...]`` for every recorded request, in completion order."""
        with self._lock:
            return [[rec.received_at, rec.status] for rec in self._records]

    def stats(self) -> dict[str, Any]:
        """Counters: totals, in-flight/peak, per-status and per-fault counts."""
        with self._lock:
            return {
                "requests_total": self._requests_total,
                "responses_ok": self._responses_ok,
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "statuses": {str(k): v for k, v in sorted(self._statuses.items())},
                "faults": {k: self._fault_counts[k] for k in FAULT_KINDS},
            }
