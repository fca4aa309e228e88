"""Adaptive sending: how many requests are in flight, how fast they leave, and when to stop
sending at all. ``max_workers``, ``rpm`` and ``tpm`` are ceilings; within them capflow adapts
to what the server shows (latency, timeouts, 429s, outages).

- ``concurrency``: the requests in flight, from latency and timeouts (a gradient limiter);
- ``learned_rate`` and ``pacing``: the pace, from 429s, rate-limit headers and the caps set;
- ``breaker``: the circuit breaker, for outages and permanent errors;
- ``sender``: one try of one request through all of them.
"""

from capflow.sending.breaker import CircuitBreaker
from capflow.sending.concurrency import AdaptiveLimit
from capflow.sending.learned_rate import LearnedRate
from capflow.sending.pacing import Pacer
from capflow.sending.sender import Sender, Stopped, estimate_tokens

__all__ = ["AdaptiveLimit", "CircuitBreaker", "LearnedRate", "Pacer", "Sender", "Stopped",
           "estimate_tokens"]
