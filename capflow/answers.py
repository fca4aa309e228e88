"""Honest answers: an answer that is not a whole answer fails its row, and says why.

A caption cut off at ``max_tokens``, a refusal, or an empty answer would otherwise be written as
if it were a caption, and the run would end with exit status 0. Each is a row error instead,
with the server's text kept in the error record, so nothing is lost and a rerun (with a larger
``max_tokens``, say) can do better. ``accept_truncated=true`` takes cut-off answers as they are.
"""

from __future__ import annotations

from capflow.errors import RowError
from capflow.redaction import clean_message
from capflow.request import Response


class AnswerError(RowError):
    """An answer that cannot stand as the row's output; ``text`` is what the server said."""

    def __init__(self, kind: str, message: str, text: str) -> None:
        super().__init__(kind, message, stage="answer")
        self.text = text

    def record(self) -> dict[str, str]:
        return {**super().record(), "text": self.text}


def check_answer(response: Response, accept_truncated: bool = False) -> None:
    """Raise ``AnswerError`` unless ``response`` is a whole, non-empty answer."""
    text = response.text or ""
    if response.refusal:
        raise AnswerError("Refused", f"the model refused: {clean_message(response.refusal, 200)}",
                          response.refusal)
    if response.finish_reason == "content_filter":
        raise AnswerError("Refused", "the answer was withheld by the server's content filter"
                          " (finish_reason=content_filter)", text)
    if not text.strip():
        raise AnswerError("EmptyAnswer",
                          f"the answer has no text (finish_reason={response.finish_reason})", text)
    if response.finish_reason == "length" and not accept_truncated:
        raise AnswerError("Truncated", "the answer was cut off at the token limit"
                          " (finish_reason=length): raise serving.max_tokens, or set"
                          " accept_truncated=true to keep cut-off answers", text)
