"""The one-screen summary printed when a step ends."""

from __future__ import annotations

from capflow.run import RunSummary

_SHOWN_FAILURES = 5


def format_summary(s: RunSummary) -> str:
    """Render ``s`` for a terminal."""
    title = "dry run" if s.dry_run else ("stopped: " + s.stopped if s.stopped else "finished")
    lines = [
        f"capflow {title} in {s.elapsed:.1f} s",
        f"  rows      {s.rows}: {s.done} done, {s.failed} failed, {s.skipped} skipped"
        " (already done)",
    ]
    if s.dry_run:
        lines.append(
            f"  requests  {s.requests} prepared, none sent; {s.images} images,"
            f" {s.image_bytes / 1e6:.1f} MB of image data"
        )
    else:
        rate = s.requests / s.elapsed if s.elapsed > 0 else 0.0
        lines += [
            f"  requests  {s.requests} sent, {s.retries} retries, {rate:.1f}/s",
            f"  tokens    {s.prompt_tokens} prompt + {s.completion_tokens} completion"
            f" = {s.prompt_tokens + s.completion_tokens}",
            f"  output    {s.output}",
        ]
    for index, error in s.failures[:_SHOWN_FAILURES]:
        lines.append(f"  failed    row {index}: {error['type']}: {error['message']}")
    if s.failed > _SHOWN_FAILURES:
        lines.append(f"  ...       {s.failed - _SHOWN_FAILURES} more failed rows (see _error)")
    return "\n".join(lines)
