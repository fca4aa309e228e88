"""The ``slow`` mark: the issue's full sizes, run with ``pytest -m slow``; left out otherwise."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the full-size runs (pytest -m slow)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("-m"):
        return  # the command line chose
    skip = pytest.mark.skip(reason="a full-size run: pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
