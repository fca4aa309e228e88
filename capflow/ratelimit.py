"""Requests-per-minute and tokens-per-minute limits: see ``capflow.sending.pacing``.

Kept so that code importing ``capflow.ratelimit.RateLimiter`` goes on working.
"""

from capflow.sending.pacing import Pacer as RateLimiter

__all__ = ["RateLimiter"]
