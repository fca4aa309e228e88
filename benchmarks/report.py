"""Figures, targets and the tables that show them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Figure:
    """One measured figure, with its target when it has one.

    :param name: what was measured.
    :param value: the figure as shown (capflow's, in side-by-side tables).
    :param target: the target as shown ("" when the figure is for information).
    :param ok: whether the target is met; None when there is no target.
    :param reference: the reference client's figure, in side-by-side tables.
    :param timing: the target only holds at full size (``--quick`` shows it, unjudged).
    """

    name: str
    value: str
    target: str = ""
    ok: bool | None = None
    reference: str | None = None
    timing: bool = False


def info(name: str, value: str, reference: str | None = None) -> Figure:
    """A figure without a target."""
    return Figure(name, value, reference=reference)


def at_most(
    name: str, value: float, limit: float, fmt: str = "{:.2f}", *,
    reference: float | None = None, timing: bool = False,
) -> Figure:
    """A figure whose target is ``value <= limit``."""
    return Figure(name, fmt.format(value), "<= " + fmt.format(limit), value <= limit,
                  _fmt(fmt, reference), timing)


def at_least(
    name: str, value: float, limit: float, fmt: str = "{:.2f}", *,
    reference: float | None = None, timing: bool = False,
) -> Figure:
    """A figure whose target is ``value >= limit``."""
    return Figure(name, fmt.format(value), ">= " + fmt.format(limit), value >= limit,
                  _fmt(fmt, reference), timing)


def check(name: str, value: str, target: str, ok: bool, reference: str | None = None) -> Figure:
    """A figure whose target is described by ``target`` and met when ``ok``."""
    return Figure(name, value, target, ok, reference)


def _fmt(fmt: str, value: float | None) -> str | None:
    return None if value is None else fmt.format(value)


@dataclass
class ScenarioResult:
    """What one scenario measured."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def add(self, *figures: Figure) -> None:
        """Append figures to the table."""
        self.figures.extend(figures)

    def judged(self, quick: bool) -> list[Figure]:
        """Figures whose target counts: all with a target, timing ones only at full size."""
        return [f for f in self.figures if f.ok is not None and not (quick and f.timing)]

    def passed(self, quick: bool) -> bool:
        """No error, and every judged target met."""
        return self.error is None and all(f.ok for f in self.judged(quick))


def _verdict(fig: Figure, quick: bool) -> str:
    if fig.ok is None:
        return ""
    if quick and fig.timing:
        return "(quick)" if fig.ok else "(quick: FAIL)"
    return "PASS" if fig.ok else "FAIL"


def render(result: ScenarioResult, quick: bool) -> str:
    """The scenario's table, its notes and its overall verdict."""
    side_by_side = any(f.reference is not None for f in result.figures)
    header = ["figure", "capflow" if side_by_side else "value"]
    if side_by_side:
        header.append("reference")
    header += ["target", "result"]
    rows = [header]
    for f in result.figures:
        row = [f.name, f.value]
        if side_by_side:
            row.append(f.reference or "")
        rows.append(row + [f.target, _verdict(f, quick)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [f"== {result.name}: {result.title}", line(header),
           "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    out += [f"   note: {n}" for n in result.notes]
    if result.error:
        out.append(f"   ERROR: {result.error}")
    out.append(f"   => {result.name}: {'PASS' if result.passed(quick) else 'FAIL'}")
    return "\n".join(out)


def render_overview(results: list[ScenarioResult], quick: bool) -> str:
    """One line per scenario: PASS/FAIL and the targets missed."""
    out = ["== overview" + (" (--quick: timing targets shown, not judged)" if quick else "")]
    for r in results:
        missed = [f.name for f in r.judged(quick) if not f.ok]
        if r.error:
            missed.append("error")
        verdict = "PASS" if r.passed(quick) else "FAIL"
        out.append(f"  {r.name:<16} {verdict}" + (f"  ({', '.join(missed)})" if missed else ""))
    return "\n".join(out)
