"""Every option of every config group composes and instantiates (as in the CLI)."""

from __future__ import annotations

from importlib import resources

import pytest

from capflow.app import build
from capflow.errors import ConfigError
from capflow.operators import Operator, PromptedVQAGenerator
from capflow.plugins import get_plugins
from capflow.serving import Serving
from capflow.storage import Storage

GROUPS = ("storage", "serving", "pipeline", "prompt")


def _options(group: str) -> list[str]:
    folder = resources.files("capflow.conf") / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_instantiates(capflow_config, group, option):
    cfg = capflow_config(f"{group}={option}", "api_url=http://127.0.0.1:9/v1", "model_name=m")
    storage = build(cfg.storage, Storage, "storage")
    serving = build(cfg.serving, Serving, "serving")
    steps = [build(node, Operator, name, serving=serving)
             for name, node in cfg.pipeline.steps.items()]
    assert steps and all(step.serving is serving for step in steps if step.sends_requests)
    assert storage.step().input_name == cfg.input
    if group == "prompt":
        assert cfg.prompt.name == option
        assert steps[0].system_prompt == cfg.prompt.system


def test_top_level_knobs_reach_the_serving(capflow_config):
    cfg = capflow_config("api_url=http://127.0.0.1:9/v1", "model_name=mm", "max_workers=33",
                        "timeout=7", "key_name_of_api_key=SOME_KEY")
    serving = build(cfg.serving, Serving, "serving")
    assert (serving.api_url, serving.model_name, serving.max_workers, serving.timeout,
            serving.key_name_of_api_key) == ("http://127.0.0.1:9/v1", "mm", 33, 7.0, "SOME_KEY")


def test_default_input_is_the_bundled_sample(capflow_config):
    cfg = capflow_config()
    assert cfg.input.endswith("sample/sample_data.json")
    assert resources.files("capflow.data").joinpath("sample/sample_data.json").is_file()


def test_a_node_of_the_wrong_kind_is_a_clear_error(capflow_config):
    cfg = capflow_config("serving._target_=capflow.storage.FileStorage",
                        "+serving.first_entry_file_name=x")
    with pytest.raises(ConfigError, match="is not a capflow Serving"):
        build(cfg.serving, Serving, "serving")


def test_bad_values_are_clear_errors(capflow_config):
    cfg = capflow_config("max_workers=0", "api_url=http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="max_workers must be at least 1"):
        build(cfg.serving, Serving, "serving")
    cfg = capflow_config("storage.cache_type=csv")
    with pytest.raises(ConfigError, match="cache_type must be one of"):
        build(cfg.storage, Storage, "storage")


def test_an_unknown_target_is_a_clear_error(capflow_config):
    cfg = capflow_config("serving._target_=capflow_nope.Missing")
    with pytest.raises(ConfigError, match="cannot import _target_ capflow_nope.Missing"):
        build(cfg.serving, Serving, "serving")


class Unregistered(PromptedVQAGenerator):
    """An operator no plugin registered."""


def test_a_class_no_plugin_registered_is_a_configuration_error(capflow_config):
    cfg = capflow_config("pipeline.steps.caption._target_=test_config.Unregistered")
    with pytest.raises(ConfigError, match=r"^pipeline.steps.caption: test_config.Unregistered"
                                          r" is not registered by any enabled plugin \(a plugin"
                                          r" registers it with the capflow_register_operators"):
        build(cfg.pipeline.steps.caption, Operator, "pipeline.steps.caption",
              serving=build(cfg.serving, Serving, "serving"))


def _leaf_keys(node, prefix: str = "") -> list[str]:  # noqa: ANN001 - a DictConfig
    """Dotted paths of every value Hydra lets the command line set (not through an
    interpolation: ``image_io: ${image}`` is set as image.*)."""
    from omegaconf import DictConfig, OmegaConf

    keys = []
    for key in node:
        path = f"{prefix}{key}"
        if OmegaConf.is_interpolation(node, key) or not isinstance(node[key], DictConfig):
            keys.append(path)
        else:
            keys += _leaf_keys(node[key], f"{path}.")
    return keys


def test_the_command_line_check_knows_every_key_and_option(capflow_config):
    # capflow.mistakes reads the YAML files rather than composing: it must never refuse what
    # Hydra takes, whatever keys conf/ gains.
    from capflow.mistakes import check

    registry = get_plugins()[1]
    cfg = capflow_config()
    keys = _leaf_keys(cfg)
    assert {"max_workers", "serving.temperature", "image.max_side", "pipeline.steps.caption"
            ".image_io", "prompt.system"} <= set(keys)
    for key in keys:
        assert check([f"{key}=1"], registry) is None, key
        assert check([f"{key[:-1]}=1"], registry) is not None, key  # ... and refuses a typo
    for group in GROUPS:
        for option in _options(group):
            assert check([f"{group}={option}"], registry) is None, (group, option)
            cfg = capflow_config(f"{group}={option}")
            for key in _leaf_keys(cfg[group], f"{group}."):
                assert check([f"{group}={option}", f"{key}=1"], registry) is None, key
