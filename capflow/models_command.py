"""``capflow models [key=value ...]``: the models a server offers, one id per line.

It takes the overrides of a run (``api_url=...``, ``key_name_of_api_key=...``,
``serving.transport=...``, ``timeout=...``, ``serving.ca_file=...``), composes capflow's config
with them as a run would (plugins loaded, so that their options resolve), builds the serving
and asks its transport for ``/models``: the same URL, key, TLS settings and proxy choice as a
run, so that what works here works there.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import sys
from itertools import takewhile
from typing import Any

from capflow.errors import CapflowError, ConfigError, ServingError
from capflow.redaction import clean_message

EXIT_OK, EXIT_SERVER, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
# model_name set to anything spares start() its own /models query (which picks the only model).
_PLACEHOLDER_MODEL = "capflow-models-listing"
USAGE = """usage: capflow models [key=value ...]

List the models the server at api_url offers, one id per line. Takes the overrides of a run:
  capflow models api_url=http://127.0.0.1:8000/v1
  capflow models api_url=https://api.openai.com/v1 key_name_of_api_key=OPENAI_API_KEY
  (also serving.transport=..., timeout=..., serving.ca_file=...)"""


def main(argv: list[str]) -> int:
    """``capflow models ...``; returns the exit status."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return EXIT_OK
    flags = [arg for arg in argv if arg.startswith("-")]
    if flags:
        return _fail(f"unknown option {flags[0]}: capflow models takes key=value overrides only",
                     EXIT_CONFIG)
    try:
        serving = _serving(argv)
    except CapflowError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    try:
        models = asyncio.run(_list(serving))
    except ServingError as exc:
        return _fail(_server_problem(exc, serving), EXIT_SERVER)
    except CapflowError as exc:  # at start: a key that cannot be sent, an unreadable ca_file
        return _fail(str(exc), EXIT_CONFIG)
    except OSError as exc:  # what a transport did not turn into a ServingError
        return _fail(f"cannot list the models at {serving.api_url}: {exc}", EXIT_SERVER)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if not models:
        print(f"capflow models: {serving.api_url}/models lists no models", file=sys.stderr)
    try:
        for model in models:
            print(clean_message(model, 300))
        sys.stdout.flush()
    except BrokenPipeError:  # `capflow models | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def _fail(message: str, status: int) -> int:
    print(f"capflow models: error: {clean_message(message)}", file=sys.stderr)
    return status


def _serving(overrides: list[str]) -> Any:
    """The serving a run with ``overrides`` would use; a ``ConfigError`` when there is none."""
    from capflow.app import build
    from capflow.serving.base import Serving
    from capflow.serving.openai import OpenAIServing

    serving = build(compose(overrides).serving, Serving, "serving")
    if not isinstance(serving, OpenAIServing):
        raise ConfigError(f"the serving {type(serving).__name__} cannot list models (only an"
                          " OpenAI-compatible serving can)")
    if not serving.api_url:
        raise ConfigError("api_url is not set: set api_url=http://HOST:PORT/v1 (the API's base"
                          " URL)")
    if not serving.model_name:
        serving.model_name = _PLACEHOLDER_MODEL
    return serving


def compose(overrides: list[str]) -> Any:
    """capflow's config composed with ``overrides``, as a run composes it (a DictConfig)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from capflow import _hydra_bridge
    from capflow.plugins import get_plugins

    _, registry = get_plugins()
    _hydra_bridge.install(registry)
    with initialize_config_module(config_module="capflow.conf", version_base=None):
        try:
            return hydra_compose("config", overrides=overrides)
        except Exception as exc:  # Hydra's and OmegaConf's many kinds of a bad override
            hint = _did_you_mean(overrides, hydra_compose)
            raise ConfigError(f"{_one_line(exc)}{hint}") from None


def _one_line(exc: Exception) -> str:
    """The first line of a Hydra error, with the options it lists for a group, if any."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    first = lines[0].rstrip(".")
    if type(exc).__name__ == "OverrideParseException":
        return f"{first}: overrides are key=value, e.g. api_url=http://127.0.0.1:8000/v1"
    if any(line.startswith("Available options in") for line in lines):
        at = next(n for n, line in enumerate(lines) if line.startswith("Available options in"))
        options = [line.strip() for line in takewhile(lambda x: x.startswith("\t"),
                                                       lines[at + 1:])]
        first += f" (options: {', '.join(options)})"
    return first


def _did_you_mean(overrides: list[str], hydra_compose: Any) -> str:
    """"; did you mean X?" for the first override whose key the config does not have and
    that is close to one it has."""
    from omegaconf import OmegaConf

    try:
        known = hydra_compose("config")
    except Exception:
        return ""
    for arg in overrides:
        key = arg.partition("=")[0].lstrip("+~")
        if not key or OmegaConf.select(known, key, default=None) is not None:
            continue
        parent, _, last = key.rpartition(".")
        node = OmegaConf.select(known, parent) if parent else known
        if not OmegaConf.is_dict(node) or last in node:
            continue
        close = difflib.get_close_matches(last, [str(k) for k in node], n=1)
        if close:
            return f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
    return ""


async def _list(serving: Any) -> list[str]:
    await serving.start()
    try:
        return list(await serving._client.list_models())
    finally:
        await serving.close()


def _server_problem(exc: ServingError, serving: Any) -> str:
    """One line saying what the server answered and what to change."""
    url = serving.api_url or ""
    message = str(exc)
    if exc.status in (401, 403):
        name = serving.key_name_of_api_key or "key_name_of_api_key"
        if not os.environ.get(name):
            fix = f"the environment variable {name} is not set: set it to the API key"
        else:
            fix = (f"check the key in the environment variable {name}, or set"
                   " key_name_of_api_key to the variable holding the right one")
        return f"{url}/models answered {message}; {fix}"
    if exc.status == 404:
        base = url.rstrip("/")
        if not base.endswith("/v1") and f"{base}/v1" not in message:
            return f"{base}/models answered {message}; did you mean api_url={base}/v1 ?"
        return f"{base}/models answered {message}; check api_url (the API's base URL)"
    return f"cannot list the models at {url}: {message}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
