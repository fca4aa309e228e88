"""When capflow spares Hydra its mode probe, and when it must not."""

from __future__ import annotations

import pytest
from hydra._internal.hydra import Hydra

from capflow._hydra_bridge import skip_mode_probe


@pytest.fixture(autouse=True)
def _restore_hydra(monkeypatch):
    monkeypatch.setattr(Hydra, "get_mode", Hydra.get_mode)  # put back after each test


@pytest.mark.parametrize("argv", [
    [],
    ["serving=openai", "model_name=m", "max_workers=20", "input=data.json"],
    ["-m", "prompt=concise,detailed"],
    ["serving.timeout=5", "+serving.extra_body.top_k=20", "image.max_side=768"],
])
def test_commands_within_capflows_own_config_skip_the_probe(argv):
    assert skip_mode_probe(argv)
    assert Hydra.get_mode(None, "config", argv) is None


@pytest.mark.parametrize("argv", [
    ["hydra.mode=MULTIRUN"],
    ["hydra.searchpath=[file:///somewhere]"],
    ["-cn", "mine"],
    ["--config-dir=/somewhere"],
    ["serving=echo"],  # a plugin's option might set the mode
    ["+sweep=two"],
    ["~prompt"],
    ["prompt=glob(*)"],
    ["prompt=concise,mine"],
    ["sweep=two"],
])
def test_commands_that_could_set_the_mode_keep_the_probe(argv):
    before = Hydra.get_mode
    assert not skip_mode_probe(argv)
    assert Hydra.get_mode is before
