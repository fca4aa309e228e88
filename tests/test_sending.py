"""The adaptive sender's parts, each against a small simulated server on the event loop: the
concurrency limit, the learned rate, the pacer's headers, the circuit breaker and the retry
policy's counting. (The same behaviour end to end, over HTTP: tests/test_adaptive_sending.py.)"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from capflow.errors import ServingError
from capflow.request import Request, Response, Usage
from capflow.retry import RetryPolicy
from capflow.run import RunSummary
from capflow.sending import AdaptiveLimit, CircuitBreaker, LearnedRate, Pacer, Sender, Stopped
from capflow.sending import breaker as breaker_module
from capflow.serving.base import Serving
from capflow.serving.ratelimit_headers import RateLimitInfo
from capflow.stop_rules import StopRules


class SlotServer(Serving):
    """Answers ``slots`` requests at once, each in ``service`` seconds; the rest wait in line.
    A request still unanswered after ``timeout`` seconds is a Timeout (and leaves the line)."""

    def __init__(self, max_workers: int, slots: int, service: float, timeout: float,
                 hang_rate: float = 0.0) -> None:
        self.max_workers, self.slots, self.service = max_workers, slots, service
        self.timeout, self.hang_rate = timeout, hang_rate
        self.requests = self.in_flight = self.peak = 0
        self._gate: asyncio.Semaphore | None = None
        self._rng = random.Random(1)

    async def complete(self, request: Request) -> Response:
        self._gate = self._gate or asyncio.Semaphore(self.slots)
        self.requests += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            async with asyncio.timeout(self.timeout):
                if self._rng.random() < self.hang_rate:
                    await asyncio.sleep(3600)
                async with self._gate:
                    await asyncio.sleep(self.service)
        except TimeoutError:
            raise ServingError("Timeout", "no answer", transient=True) from None
        finally:
            self.in_flight -= 1
        return Response("a caption", Usage(10, 5), "stop")


class RateServer(Serving):
    """Accepts ``per_second`` requests in each one-second window; the rest get 429."""

    def __init__(self, max_workers: int, per_second: int, random_429: float = 0.0) -> None:
        self.max_workers, self.per_second, self.random_429 = max_workers, per_second, random_429
        self.requests = 0
        self._window = (0, 0)
        self._rng = random.Random(2)

    async def complete(self, request: Request) -> Response:
        self.requests += 1
        await asyncio.sleep(0.002)
        second = int(time.monotonic())
        current, count = self._window
        count = count + 1 if second == current else 1
        self._window = (second, count)
        if count > self.per_second or self._rng.random() < self.random_429:
            raise ServingError("RateLimited", "HTTP 429: slow down", transient=True,
                               retry_after=0.2, status=429)
        return Response("a caption", Usage(10, 5), "stop")


class FailingServer(Serving):
    """Fails every request with the same 500 while ``failing`` is true."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self.failing = True
        self.requests = 0

    async def complete(self, request: Request) -> Response:
        self.requests += 1
        await asyncio.sleep(0.005)
        if self.failing:
            raise ServingError("ServerError", "HTTP 500: image input is not supported",
                               transient=True, status=500)
        return Response("a caption", Usage(10, 5), "stop")


async def _drive(serving: Serving, rows: int, *, outage_s: float = 60.0,
                 retry: RetryPolicy | None = None) -> tuple[Sender, RunSummary, dict[str, int]]:
    """Send one request per row through a Sender, as the engine does."""
    summary = RunSummary()
    retry = retry or RetryPolicy(initial_wait=0.01, max_wait=0.1)

    def stop(reason: str) -> None:
        summary.stopped = summary.stopped or reason
        sender.stopping(reason)

    sender = Sender(serving, summary, StopRules(), stop, outage_s=outage_s)
    counts = {"done": 0, "failed": 0, "left": 0}
    room = asyncio.Semaphore(int(serving.max_workers) * 2)

    async def row(index: int) -> None:
        try:
            await retry.call(lambda r: sender.send(r, index), Request([], estimated_tokens=10),
                             lambda exc: None)
            counts["done"] += 1
        except Stopped:
            counts["left"] += 1
        except Exception:  # a serving's failure of any kind fails the row, as in the engine
            counts["failed"] += 1
        finally:
            room.release()

    tasks = []
    for index in range(rows):
        if summary.stopped:
            counts["left"] += rows - index
            break
        await room.acquire()
        tasks.append(asyncio.create_task(row(index)))
    await asyncio.gather(*tasks)
    sender.report(summary)
    return sender, summary, counts


def test_the_limit_finds_a_queueing_servers_capacity_without_timeouts():
    server = SlotServer(max_workers=64, slots=4, service=0.02, timeout=0.2)
    began = time.monotonic()
    _, summary, counts = asyncio.run(_drive(server, 300))
    elapsed = time.monotonic() - began
    assert counts["done"] == 300
    assert server.requests <= 300 * 1.05  # hardly any request timed out and was sent again
    ideal = 300 / 4 * 0.02
    assert elapsed <= 2 * ideal
    assert server.peak < 64 and summary.limit < 64  # it never kept 64 waiting at the server


def test_a_server_with_room_for_everything_keeps_the_ceiling():
    server = SlotServer(max_workers=32, slots=32, service=0.05, timeout=5)
    _, summary, counts = asyncio.run(_drive(server, 400))
    assert counts["done"] == 400 and server.requests == 400
    assert server.peak == 32 and summary.limit == 32 and summary.limit_lowest == 32


def test_requests_that_hang_at_random_do_not_shrink_the_limit():
    # Answers take 50 ms, far above the event loop's own jitter: latency stays at baseline.
    server = SlotServer(max_workers=16, slots=16, service=0.05, timeout=0.25, hang_rate=0.03)
    _, summary, counts = asyncio.run(_drive(server, 600))
    assert counts["done"] == 600
    assert server.requests > 600  # some hung and were sent again
    assert summary.limit_lowest == 16


def test_many_timeouts_shrink_the_limit_though_latency_looks_as_usual():
    # A baseline taken while the client itself was slow to start looks like a queue's: what
    # is left to say the server is full is that a third of the requests time out.
    limit = AdaptiveLimit(64)
    limit._warm, limit._slow_start, limit.limit = True, False, 64.0

    async def go() -> None:
        tickets = [await limit.acquire() for _ in range(40)]
        sent = time.monotonic()
        for ticket in tickets[:10]:
            limit.release(ticket, sent - 0.1, "ok", 10)
        assert limit.limit == 64
        for ticket in tickets[10:25]:
            limit.release(ticket, sent, "timeout")
        for ticket in tickets[25:]:
            limit.release(ticket, sent, "none")

    asyncio.run(go())
    assert limit.limit == 48  # one decrease: the later timeouts were sent before it


def test_overload_answers_shrink_the_limit_and_it_grows_back():
    limit = AdaptiveLimit(40)
    limit._warm, limit.limit = True, 40.0

    async def go() -> None:
        tickets = [await limit.acquire() for _ in range(10)]
        sent = time.monotonic()
        limit.release(tickets[0], sent, "overload")
        assert limit.limit == 30
        limit.release(tickets[1], sent - 1, "overload")  # sent before that decrease: judged
        assert limit.limit == 30
        for ticket in tickets[2:]:
            limit.release(ticket, sent, "none")

    asyncio.run(go())
    assert limit.lowest == 30


def test_a_fixed_limit_when_adaptive_is_off():
    limit = AdaptiveLimit(12, adaptive=False)
    assert limit.limit == 12

    async def go() -> None:
        tickets = [await limit.acquire() for _ in range(12)]
        for ticket in tickets:
            limit.release(ticket, time.monotonic() - 100, "timeout")

    asyncio.run(go())
    assert limit.limit == 12


def test_the_rate_is_learned_from_429s_and_few_requests_are_refused():
    server = RateServer(max_workers=32, per_second=40)
    began = time.monotonic()
    sender, _, counts = asyncio.run(_drive(server, 160))
    elapsed = time.monotonic() - began
    assert counts["done"] == 160
    assert server.requests <= 2 * 160
    assert elapsed <= 1.5 * (160 / 40) + 1.0  # the first window is partial
    assert sender.pacer.learned.rate is not None
    assert 30 <= sender.pacer.learned.rate <= 80  # about PROBE x 40, noisy in the first second


def test_random_429s_teach_no_rate():
    learned = LearnedRate()
    now = 1000.0
    for i in range(400):
        learned.sent(now)
        if i % 10 == 0:
            learned.limited(now)
        else:
            learned.success(now)
        now += 0.01
    assert learned.rate is None and learned.refusals == 40


def test_a_429_does_not_use_up_the_rows_attempts():
    calls = []

    async def refuse_then_answer(_: object) -> str:
        calls.append(1)
        if len(calls) < 6:
            raise ServingError("RateLimited", "429", transient=True, retry_after=0.01)
        return "ok"

    policy = RetryPolicy(max_attempts=2, initial_wait=0.01, max_wait=0.01)
    assert asyncio.run(policy.call(refuse_then_answer, None, lambda exc: None)) == "ok"
    assert len(calls) == 6


def test_waiting_out_rate_limits_is_bounded_by_max_time():
    async def always_refuse(_: object) -> str:
        raise ServingError("RateLimited", "429", transient=True, retry_after=0.05)

    policy = RetryPolicy(max_attempts=2, initial_wait=0.01, max_time=0.4)
    began = time.monotonic()
    with pytest.raises(ServingError):
        asyncio.run(policy.call(always_refuse, None, lambda exc: None))
    assert time.monotonic() - began < 1.0


def test_retry_after_is_honoured_with_jitter():
    policy = RetryPolicy()
    exc = ServingError("RateLimited", "429", transient=True, retry_after=2.0)
    waits = [policy._seconds(exc, 0, 1) for _ in range(200)]
    assert min(waits) >= 2.0 and max(waits) <= 2.6
    assert max(waits) - min(waits) > 0.2  # spread: the rows do not come back in lockstep


def test_headers_that_say_little_is_left_pace_the_requests():
    pacer = Pacer()
    assert not pacer.active
    pacer.succeeded(RateLimitInfo(limit_requests=600, remaining_requests=5, reset_requests=59))
    assert pacer.active
    assert pacer.rate() == pytest.approx(595 / 59 * 0.98, rel=0.01)


def test_an_empty_window_holds_every_sender_until_its_reset():
    pacer = Pacer()

    async def go() -> float:
        pacer.rate_limited(0.3, RateLimitInfo(limit_requests=10, remaining_requests=0,
                                              reset_requests=0.3))
        began = time.monotonic()
        await pacer.acquire(0)
        return time.monotonic() - began

    assert asyncio.run(go()) >= 0.25


def test_the_breaker_stops_a_run_whose_every_request_fails():
    server = FailingServer(max_workers=10)
    _, summary, counts = asyncio.run(_drive(server, 200, outage_s=1.5))
    assert summary.stopped and "image input is not supported" in summary.stopped
    assert "stop.outage_s=1.5" in summary.stopped
    assert server.requests <= 20
    assert counts["done"] == 0 and counts["left"] >= 190


def test_the_breaker_rides_out_an_outage(monkeypatch):
    monkeypatch.setattr(breaker_module, "PROBE_FIRST", 0.05)
    monkeypatch.setattr(breaker_module, "PROBE_MAX", 0.1)
    server = FailingServer(max_workers=8)
    server.failing = False

    async def go() -> tuple[RunSummary, dict[str, int]]:
        async def outage() -> None:
            await asyncio.sleep(0.1)
            server.failing = True
            await asyncio.sleep(1.0)
            server.failing = False

        task = asyncio.create_task(outage())
        _, summary, counts = await _drive(server, 600, outage_s=30,
                                          retry=RetryPolicy(max_attempts=3, initial_wait=0.01))
        await task
        return summary, counts

    summary, counts = asyncio.run(go())
    assert counts == {"done": 600, "failed": 0, "left": 0}
    assert summary.outages == 1 and summary.stopped is None
    assert server.requests < 600 + 60  # probes, not a flood, during the outage


def test_failures_among_answers_do_not_open_the_breaker():
    breaker = CircuitBreaker()
    for row in range(50):
        breaker.succeeded(False)
        sent = time.monotonic() - 1  # sent before the answer that just came back
        assert not breaker.failed("ServerError:500", "HTTP 500", row, sent, False)
    assert not breaker.open


def test_one_row_failing_again_and_again_does_not_open_the_breaker():
    breaker = CircuitBreaker()
    for _ in range(20):
        assert not breaker.failed("ServerError:500", "HTTP 500", 7, time.monotonic(), False)
    assert not breaker.open
    for row in range(4):
        breaker.failed("ServerError:500", "HTTP 500", row, time.monotonic(), False)
    assert breaker.open


class RecoveringServer(FailingServer):
    """Fails with a 500 for its first ``down`` requests; the next one gets ``then`` raised (a
    429, or a bug in a serving); every later one is answered."""

    def __init__(self, max_workers: int, down: int, then: Exception) -> None:
        super().__init__(max_workers)
        self.down, self.then = down, then

    async def complete(self, request: Request) -> Response:
        self.requests += 1
        await asyncio.sleep(0.005)
        if self.requests <= self.down:
            raise ServingError("ServerError", "HTTP 500: down", transient=True, status=500)
        if self.requests == self.down + 1:
            raise self.then
        return Response("a caption", Usage(10, 5), "stop")


@pytest.mark.parametrize("then", [
    ServingError("RateLimited", "HTTP 429", transient=True, retry_after=0.01, status=429),
    KeyError("a bug in a serving"),
], ids=["429", "bug"])
def test_a_probe_answered_otherwise_never_leaves_the_rows_waiting(monkeypatch, then):
    monkeypatch.setattr(breaker_module, "PROBE_FIRST", 0.05)
    server = RecoveringServer(max_workers=4, down=6, then=then)

    async def go() -> tuple[RunSummary, dict[str, int]]:
        _, summary, counts = await asyncio.wait_for(_drive(server, 20, outage_s=30), 10)
        return summary, counts

    summary, counts = asyncio.run(go())
    assert counts["done"] >= 19 and counts["left"] == 0 and summary.stopped is None


def test_a_probe_failing_after_the_breaker_closed_does_not_stop_the_run():
    breaker = CircuitBreaker(outage_s=0.2)
    for row in range(5):
        breaker.failed("ServerError:500", "HTTP 500", row, time.monotonic(), False)
    assert breaker.open

    async def go() -> None:
        assert await breaker.admit() is True  # the probe goes
        breaker.succeeded(False)  # an older request's answer closes the breaker
        await asyncio.sleep(0.3)
        breaker.failed("ServerError:500", "HTTP 500", 99, time.monotonic() - 0.3, True)

    asyncio.run(go())
    assert not breaker.open and breaker.stopped is None


def test_a_stop_wakes_senders_waiting_for_their_pace():
    pacer = Pacer(rpm=6)  # one request every ten seconds

    async def go() -> float:
        await pacer.acquire(0)
        began = time.monotonic()
        waiting = asyncio.create_task(pacer.acquire(0))
        await asyncio.sleep(0.1)
        pacer.stop()
        await waiting
        return time.monotonic() - began

    assert asyncio.run(go()) < 1.0


def test_without_the_breaker_an_unreachable_server_still_stops_the_run():
    class Refused(Serving):
        max_workers, requests = 4, 0

        async def complete(self, request: Request) -> Response:
            self.requests += 1
            raise ServingError("ConnectionError", "connection refused", transient=True)

    server = Refused()
    summary = RunSummary()

    def stop(reason: str) -> None:
        summary.stopped = summary.stopped or reason

    sender = Sender(server, summary, StopRules(), stop, adaptive=False)

    async def go() -> None:
        for row in range(30):
            with pytest.raises(ServingError):
                await sender.send(Request([]), row)
            if summary.stopped:
                break

    asyncio.run(go())
    assert summary.stopped and "cannot be reached" in summary.stopped
    assert server.requests == 20
