"""Splitting the run's budgets between the actors, so that together they cannot pass them.

Each of ``n`` actors gets ``1/n`` of every budget: requests in flight (``max_workers``, rounded
down, at least 1), requests and tokens per minute (``rpm``, ``tpm``), tokens and cost in all
(``max_tokens_total``, ``max_cost``) and a count of failed rows (``max_failures`` when a count;
a fraction stays as it is). The sum of the shares never exceeds the whole; an actor whose share
is spent stops while another may still have some, so a run can end a little before the whole
budget is spent, never after.
"""

from __future__ import annotations

from typing import Any

SPLIT = ("rpm", "tpm", "max_tokens_total", "max_cost")


def share(config: dict[str, Any], actors: int) -> dict[str, Any]:
    """``config`` (the composed config, resolved) with each budget divided by ``actors``."""
    out = dict(config)
    serving = dict(out.get("serving") or {})
    total = int(serving.get("max_workers") or out.get("max_workers") or 1)
    serving["max_workers"] = max(1, total // actors)
    out["serving"] = serving
    out["max_workers"] = serving["max_workers"]
    for key in SPLIT:
        if out.get(key) is not None:
            out[key] = out[key] / actors
    failures = out.get("max_failures")
    if isinstance(failures, int) and not isinstance(failures, bool) and failures >= 1:
        out["max_failures"] = max(1, failures // actors)
    return out
