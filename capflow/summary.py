"""The one-screen summary printed when a step ends."""

from __future__ import annotations

from typing import Any

from capflow.redaction import clean_message
from capflow.run import RunSummary

_SHOWN_FAILURES = 5


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def format_summary(s: RunSummary) -> str:
    """Render ``s`` for a terminal."""
    title = "dry run" if s.dry_run else ("stopped" if s.stopped else "finished")
    lines = [f"capflow {title} in {s.elapsed:.1f} s"]
    of_total = f" of {s.total}" if s.total is not None else ""
    if s.dry_run:
        lines += [
            f"  rows      {s.rows}{of_total}: {s.done} ready, {s.failed} would fail"
            + (f", {s.dropped} would be dropped" if s.dropped_output else ""),
            f"  requests  {s.requests} to send ({s.cache_hits} answered by the cache), none sent;"
            f" {_plural(s.images, 'image')}, {s.image_bytes / 1e6:.2f} MB of image data",
            f"  tokens    ~{s.image_tokens} image tokens in all (estimated)",
        ]
        for index, images, tokens in sorted(s.row_estimates):
            lines.append(f"    row {index}: {_plural(images, 'image')}, ~{tokens} image tokens")
        if s.rows > len(s.row_estimates):
            lines.append("    ...")
        if s.example:
            lines.append("  first row's request:")
            lines += [f"    {line}" for line in _describe_messages(s.example)]
    elif s.dropped_output:  # a filter step: it sends nothing
        lines += [
            f"  rows      {s.rows}{of_total}: {s.done} kept, {s.dropped} dropped,"
            f" {s.failed} failed",
            f"  output    {s.output}",
            f"  dropped   {_plural(s.dropped, 'row')}: {s.dropped_output}",
        ]
    else:
        unfinished = s.rows - s.done - s.failed - s.skipped
        if s.total is not None:
            unfinished = s.total - s.done - s.failed - s.skipped
        rate = s.requests / s.elapsed if s.elapsed > 0 else 0.0
        lines += [
            f"  rows      {s.rows}{of_total}: {s.done} done, {s.failed} failed,"
            f" {s.skipped} skipped (already done)"
            + (f", {unfinished} not finished" if unfinished > 0 else ""),
            f"  requests  {s.requests} sent, {s.retries} retries, {rate:.1f}/s;"
            f" {s.cache_hits} answered by the cache ({s.cache_size} stored)",
            f"  tokens    {s.prompt_tokens} prompt + {s.completion_tokens} completion"
            f" = {s.prompt_tokens + s.completion_tokens}"
            + (f", cost {s.cost:.4f}" if s.cost else "")
            + (f" (batch price; {s.saved:.4f} less than live requests)" if s.saved else "")
            + (f" (estimated for {_plural(s.estimated_usage, 'answer')} without usage)"
               if s.estimated_usage else ""),
        ]
        sending = _sending(s)
        if sending:
            lines.append(f"  sending   {sending}")
        lines.append(f"  output    {s.output}: {s.output_ok} captioned, {s.output_failed} failed")
        if s.stopped:
            lines.append(f"  stopped   {clean_message(s.stopped)}")
            lines.append("            rows not finished are left for the next run of this command")
    failures = sorted(s.failures, key=lambda f: f[0])[:_SHOWN_FAILURES]
    for index, error in failures:
        lines.append(f"  failed    row {index}: {clean_message(error['type'], 40)}:"
                     f" {clean_message(error['message'], 300)}")
    more = s.failed - len(failures)
    if more > 0 and s.dry_run:
        lines.append(f"  ...       {more} more rows would fail")
    elif more > 0:
        lines.append(f"  ...       {more} more failed rows (see their _error records)")
    return "\n".join(lines)


def _sending(s: RunSummary) -> str:
    """What the adaptive sending did, when it did anything worth a line."""
    parts = []
    if s.max_workers and s.limit_lowest < s.max_workers:
        parts.append(f"in flight adapted to the server: lowest {s.limit_lowest},"
                     f" {s.limit} at the end, of max_workers={s.max_workers}")
    elif s.max_workers and s.requests:
        parts.append(f"in flight: limit {s.limit} of max_workers={s.max_workers}")
    if s.rate_limited:
        pace = f", paced at {s.learned_rate:.1f}/s learned from them" if s.learned_rate else ""
        parts.append(f"{_plural(s.rate_limited, '429 answer')}{pace}")
    if s.outages:
        parts.append(f"sending paused {_plural(s.outages, 'time')} for an outage")
    return "; ".join(parts)


def _describe_messages(messages: list[dict[str, Any]]) -> list[str]:
    """One line per message, with images shown by type and size instead of their data."""
    out = []
    for message in messages:
        content = message["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        shown = []
        for part in parts:
            if part["type"] == "text":
                text = part["text"]
                shown.append(repr(text if len(text) <= 70 else text[:67] + "..."))
            else:
                url = part["image_url"]["url"]
                if url.startswith("data:"):
                    mime = url[5 : url.index(";")]
                    size = (len(url) - url.index(",") - 1) * 3 // 4
                    shown.append(f"[{mime}, {size / 1000:.1f} kB]")
                else:
                    shown.append(f"[{url}]")
        out.append(f"{message['role']}: {' '.join(shown)}")
    return out
