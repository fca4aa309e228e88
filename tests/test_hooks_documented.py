"""Every hook in capflow.hookspecs has its own section in docs/plugins.md, and every hook
section there names a real hook."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from capflow import hookspecs

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOK_HEADING = re.compile(r"^### (capflow_\w+)\s*$", re.MULTILINE)


def hooks() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(func)
        for name, func in vars(hookspecs).items()
        if name.startswith("capflow_") and callable(func)
    }


def sections() -> dict[str, str]:
    """``### capflow_*`` heading -> the text up to the next heading, in document order."""
    text = DOC.read_text(encoding="utf-8")
    found: dict[str, str] = {}
    for match in HOOK_HEADING.finditer(text):
        rest = text[match.end():]
        next_heading = re.search(r"^#{1,3} ", rest, re.MULTILINE)
        body = rest[: next_heading.start()] if next_heading else rest
        assert match[1] not in found, f"{match[1]} has two sections"
        found[match[1]] = body
    return found


def test_the_hookspecs_are_found():
    assert len(hooks()) >= 7
    assert "capflow_register_servings" in hooks()


def test_every_hook_has_a_section():
    missing = sorted(set(hooks()) - set(sections()))
    assert not missing, f"hooks without a '### <name>' heading in {DOC.name}: {missing}"


def test_every_hook_section_names_a_real_hook():
    unknown = sorted(set(sections()) - set(hooks()))
    assert not unknown, f"'### capflow_*' headings in {DOC.name} naming no hook: {unknown}"


def test_every_hook_section_documents_its_parameters_with_an_example():
    documented = sections()
    for name, signature in hooks().items():
        body = documented.get(name, "")
        for param in signature.parameters:
            assert f"`{param}`" in body, f"{name}: parameter {param!r} is not documented"
        assert "```python" in body and f"def {name}(" in body, f"{name}: no example"


def test_every_hook_has_a_test_named_after_it():
    tests = Path(__file__).resolve().parent
    names = {m[1] for path in tests.glob("test_*.py")
             for m in re.finditer(r"^def (test_\w+)\(", path.read_text(encoding="utf-8"),
                                  re.MULTILINE)}
    untested = sorted(h for h in hooks() if not any(n.startswith(f"test_{h}_") for n in names))
    assert not untested, f"hooks without a test named test_<hook>_...: {untested}"
