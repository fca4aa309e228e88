"""The comparison's files for people: ``comparison.md`` (the figures as a table),
``comparison.html`` (one self-contained page: the table, then each sample row's thumbnail beside
every job's answer) and ``comparison.png`` (bar charts of the main figures, drawn with
matplotlib's Agg backend and no global state). ``capflow/comparison.py`` computes what they
show."""

from __future__ import annotations

import html
import io
import os
import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from capflow.redaction import clean_message
from capflow.show import Entry

if TYPE_CHECKING:
    from capflow.comparison import Comparison, JobFigures, SampleRow
    from capflow.gallery import Thumb


_COLUMNS = (("rows", "rows"), ("done", "done"), ("failed", "failed"),
            ("mean_caption_chars", "mean chars"), ("median_caption_chars", "median chars"),
            ("prompt_tokens", "prompt tokens"), ("completion_tokens", "completion tokens"),
            ("cost", "cost"), ("elapsed_s", "elapsed s"))


def figure_table(jobs: list[JobFigures]) -> tuple[list[str], list[list[str]]]:
    """The figures as text: the column heads, and one row per job (its label first)."""
    heads = ["job", *(head for _, head in _COLUMNS)]
    rows = []
    for job in jobs:
        cells = [job.label]
        for key, _ in _COLUMNS:
            value = getattr(job, key)
            cells.append(f"{value:.6f}" if key == "cost" else f"{value:.2f}" if key == "elapsed_s"
                         else f"{value:.1f}" if isinstance(value, float) else f"{value:,}")
        rows.append(cells)
    return heads, rows


def markdown(comparison: Comparison) -> str:
    """The content of ``comparison.md``: the figures, one row per job, and where each is."""
    heads, rows = figure_table(comparison.jobs)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    out = [f"# capflow: comparison of {len(comparison.jobs)} jobs", "", line(heads),
           "|" + "---|" + "---:|" * (len(heads) - 1), *map(line, rows), "", "Outputs:", ""]
    for job in comparison.jobs:
        out.append(f"- {job.label}: `{job.output}`")
        out += [f"  - note: {note}" for note in job.notes]
    return "\n".join(out) + "\n"


_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .6em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; background: #fff; }
td, th { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
table.figures td { text-align: right; font-variant-numeric: tabular-nums; }
table.figures td.path { text-align: left; font-size: .8em; color: #555; overflow-wrap: anywhere; }
table.samples thead th { position: sticky; top: 0; background: #eef; }
table.samples td { min-width: 12em; max-width: 40em; }
td.image { width: 200px; }
td.image img { display: block; max-width: 192px; max-height: 192px; border: 1px solid #ccc; }
td.image p { margin: 0 0 .3em; font-size: .85em; color: #555; overflow-wrap: anywhere; }
div.missing { width: 180px; padding: 6px; border: 2px dashed #c33; color: #922; font-size: .85em;
  overflow-wrap: anywhere; }
p.caption { white-space: pre-wrap; margin: 0; overflow-wrap: anywhere; }
td.failed { background: #fff5f5; color: #922; overflow-wrap: anywhere; }
td.failed strong { background: #c33; color: #fff; padding: 0 .35em; border-radius: 3px; }
td.absent, td.plain { color: #888; font-style: italic; }
p.note { color: #555; }
"""


def page(comparison: Comparison) -> str:
    """The content of ``comparison.html``: the figures, then each sample row's thumbnail beside
    every job's answer. Self-contained (thumbnails are ``data:`` URIs) and fetches nothing."""
    jobs, samples = comparison.jobs, comparison.samples
    title = f"capflow: comparison of {len(jobs)} jobs"
    heads, rows = figure_table(jobs)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        # As the gallery's: images are data: URIs, style is inline, there is no script.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none';"
        " img-src data:; style-src 'unsafe-inline'\">\n",
        f"<title>{_escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        f"<h1>{_escape(title)}</h1>\n<table class=\"figures\">\n<thead><tr>",
        "".join(f"<th>{_escape(h)}</th>" for h in heads), "<th>output</th></tr></thead>\n",
    ]
    for job, cells in zip(jobs, rows, strict=True):
        parts.append(f"<tr><th>{_escape(cells[0])}</th>"
                     + "".join(f"<td>{_escape(c)}</td>" for c in cells[1:])
                     + f"<td class=\"path\">{_escape(job.output)}</td></tr>\n")
    parts.append("</table>\n")
    parts += [f"<p class=\"note\">{_escape(job.label)}: {_escape(note)}</p>\n"
              for job in jobs for note in job.notes]
    if samples:
        parts.append(f"<h2>{len(samples)} sample rows, the same in every job</h2>\n"
                     "<table class=\"samples\">\n<thead><tr><th>row</th>"
                     + "".join(f"<th>{_escape(job.label)}</th>" for job in jobs)
                     + "</tr></thead>\n")
        for sample, thumb in zip(samples, _thumbnails(samples), strict=True):
            parts.append(f"<tr id=\"row-{sample.index}\"><td class=\"image\">"
                         f"{_image_cell(sample, thumb)}</td>"
                         + "".join(_answer_cell(entry) for entry in sample.entries)
                         + "</tr>\n")
        parts.append("</table>\n")
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def _image_cell(sample: SampleRow, thumb: Thumb | None) -> str:
    head = f"row {sample.index}"
    if sample.row_id is not None:
        head += f", id {clean_message(sample.row_id, 100)}"
    parts = [f"<p>{_escape(head)}</p>"]
    if thumb is None:
        parts.append("<div class=\"missing\">no image in this row</div>")
    elif thumb.uri:
        width, height = thumb.size
        parts.append(f"<img src=\"{thumb.uri}\" width=\"{width}\" height=\"{height}\""
                     f" alt=\"row {sample.index}\">")
    elif thumb.link:
        parts.append(f"<div class=\"missing\"><a href=\"{html.escape(thumb.link)}\""
                     " rel=\"noreferrer\">remote image (not fetched)</a></div>")
    else:
        parts.append(f"<div class=\"missing\">{_escape(thumb.problem or '')}</div>")
    if thumb is not None:
        parts.append(f"<p>{_escape(thumb.ref)}</p>")
    if len(sample.images) > 1:
        parts.append(f"<p>+{len(sample.images) - 1} more images</p>")
    return "".join(parts)


def _answer_cell(entry: Entry | None) -> str:
    if entry is None:
        return "<td class=\"absent\">no such row in this output</td>"
    if entry.error:
        kind, message = entry.error
        return f"<td class=\"failed\"><strong>{_escape(kind)}</strong> {_escape(message)}</td>"
    if entry.caption is None:
        return "<td class=\"plain\">no answer</td>"
    return f"<td><p class=\"caption\">{_escape(entry.caption)}</p></td>"


def _escape(text: object) -> str:
    """Text made safe for HTML, control characters and secrets removed, line breaks kept."""
    return html.escape("\n".join(clean_message(line, None) for line in str(text).split("\n")))


def _thumbnails(samples: list[SampleRow]) -> list[Thumb | None]:
    """Each sample row's first image as a ``capflow.gallery.Thumb`` (None: the row has none),
    made in a few threads (Pillow releases the interpreter lock while it decodes)."""
    from capflow.gallery import make_thumb

    def one(sample: SampleRow) -> Thumb | None:
        return make_thumb(sample.images[0], sample.root) if sample.images else None

    with ThreadPoolExecutor(min(4, (os.cpu_count() or 2) + 1)) as pool:
        return list(pool.map(one, samples))


def png(comparison: Comparison) -> bytes:
    """The content of ``comparison.png``: one bar per job for rows done and failed, caption
    length, tokens and time. A ``Figure`` of its own, without pyplot's global state."""
    from matplotlib.figure import Figure

    jobs = comparison.jobs
    places = list(range(len(jobs)))
    labels = ["\n".join(textwrap.wrap(job.label, 28, break_on_hyphens=False)) or job.label
              for job in jobs]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(14, 1.4 + 0.3 * lines + 0.25 * len(jobs)), layout="constrained")
    rows, chars, tokens, elapsed = fig.subplots(1, 4, sharey=True)
    done = [job.done for job in jobs]
    rows.barh(places, done, color="#4a8", label="done")
    rows.barh(places, [job.failed for job in jobs], left=done, color="#c33", label="failed")
    chars.barh(places, [job.mean_caption_chars for job in jobs], color="#58b", label="mean")
    chars.plot([job.median_caption_chars for job in jobs], places, "k|", markersize=14,
               label="median")
    prompt = [job.prompt_tokens for job in jobs]
    tokens.barh(places, prompt, color="#97c", label="prompt")
    tokens.barh(places, [job.completion_tokens for job in jobs], left=prompt, color="#d9a",
                label="completion")
    elapsed.barh(places, [job.elapsed_s for job in jobs], color="#888")
    for axes, title in ((rows, "rows"), (chars, "caption characters"), (tokens, "tokens"),
                        (elapsed, "elapsed seconds")):
        axes.set_title(title)
        axes.set_xlim(left=0)
        axes.grid(axis="x", alpha=.3)
        if axes is not elapsed:  # below the bars, which it would hide
            axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08),
                        ncols=2, frameon=False)
    rows.set_yticks(places, labels)
    rows.invert_yaxis()  # the first job on top, as in the table
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()
