"""When a run stops early, cleanly: systematic failures and spending budgets.

A wrong key or model makes every request fail the same way; capflow stops after the first few
such failures instead of burning through the dataset. ``max_failures`` catches everything else
that fails too often, and the token and cost budgets stop a run that would spend too much.
"""

from __future__ import annotations

from dataclasses import dataclass

# Errors that will not go away by themselves: the same key, model or endpoint fails every row.
# (An outage, or a server that fails every request some other way, is the circuit breaker's:
# capflow.sending.breaker.)
FATAL_KINDS = {
    "AuthenticationError": "check the API key (the variable named by key_name_of_api_key)",
    "PermissionDenied": "check the API key's permissions for this model",
    "NotFound": "check model_name (capflow models lists the server's) and api_url",
    "QuotaExceeded": "the account's quota is used up",
    "TLSError": "",
    "Redirected": "",
}
# The setting each advice is about. A message that already names it needs no advice after it:
# the serving said what to change (OpenAIServing: "api_url ... does not end in /v1; did you
# mean ...?", "the environment variable ... is not set (key_name_of_api_key names it)").
_ADVICE_ABOUT = {"AuthenticationError": "key_name_of_api_key",
                 "PermissionDenied": "key_name_of_api_key", "NotFound": "api_url"}
FATAL_AFTER = 3  # consecutive failures of one fatal kind ...
FATAL_AT_ONCE = {"QuotaExceeded", "TLSError", "Redirected"}  # ... or one, for these

_MIN_ROWS_FOR_FRACTION = 20


@dataclass
class StopRules:
    """Decides whether a run should stop.

    :param max_failures: stop when more rows than this have failed: a count (``50``) or a
        fraction of the rows finished so far (``0.2``, judged once 20 rows have finished).
        None: never stop for failures alone.
    :param max_tokens_total: stop once prompt + completion tokens reach this.
    :param max_cost: stop once the spend reaches this (in the currency of the prices).
    :param prompt_price: price per million prompt tokens.
    :param completion_price: price per million completion tokens.
    """

    max_failures: float | None = None
    max_tokens_total: int | None = None
    max_cost: float | None = None
    prompt_price: float = 0.0
    completion_price: float = 0.0

    def __post_init__(self) -> None:
        self._streak_kind: str | None = None
        self._streak = 0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Spend for the given token counts."""
        return (prompt_tokens * self.prompt_price + completion_tokens * self.completion_price) / 1e6

    def after_request(self, kind: str | None, message: str = "") -> str | None:
        """Record one request outcome (``kind`` None for success); a reason to stop, or None."""
        if kind is None or kind not in FATAL_KINDS:
            self._streak_kind, self._streak = None, 0
            return None
        self._streak = self._streak + 1 if kind == self._streak_kind else 1
        self._streak_kind = kind
        if self._streak >= FATAL_AFTER or kind in FATAL_AT_ONCE:
            advice = FATAL_KINDS[kind]
            if kind in _ADVICE_ABOUT and _ADVICE_ABOUT[kind] in message:
                return f"every request fails with {kind}: {message}"
            if kind in FATAL_AT_ONCE:  # the message says what to do
                return f"{kind}: {message}" + (f": {advice}" if advice else "")
            return f"every request fails with {kind} ({message}): {advice}"
        return None

    def after_row(self, finished: int, failed: int) -> str | None:
        """A reason to stop given the rows finished and failed so far, or None."""
        limit = self.max_failures
        if limit is None:
            return None
        if 0 < limit < 1:
            if finished >= _MIN_ROWS_FOR_FRACTION and failed > limit * finished:
                return f"{failed} of {finished} rows failed, more than max_failures={limit:g}"
        elif failed > limit:
            return f"{failed} rows failed, more than max_failures={limit:g}"
        return None

    def before_request(self, prompt_tokens: int, completion_tokens: int, reserved: int
                       ) -> str | None:
        """A reason not to send another request: the tokens spent so far plus those ``reserved``
        by requests in flight (this one included) would pass a budget."""
        if self.max_tokens_total is None and self.max_cost is None:
            return None
        # Answers are not known in advance: expect them in the proportion seen so far.
        ratio = completion_tokens / prompt_tokens if prompt_tokens else 0.0
        return self.after_spend(prompt_tokens + reserved,
                                completion_tokens + int(reserved * ratio), projected=True)

    def after_spend(self, prompt_tokens: int, completion_tokens: int, projected: bool = False
                    ) -> str | None:
        """A reason to stop given the tokens spent so far, or None."""
        total = prompt_tokens + completion_tokens
        spent = self.cost(prompt_tokens, completion_tokens)
        # Sending stops before a request could pass the budget, and once it is reached.
        tokens_over = self.max_tokens_total is not None and (
            total > self.max_tokens_total if projected else total >= self.max_tokens_total
        )
        cost_over = self.max_cost is not None and (
            spent > self.max_cost if projected else spent >= self.max_cost
        )
        if tokens_over:
            return (f"the token budget max_tokens_total={self.max_tokens_total} is spent"
                    " (each run has its own budget)")
        if cost_over:
            return f"the budget max_cost={self.max_cost:g} is spent (each run has its own budget)"
        return None
