"""The ``capflow`` command: a Hydra application, plus ``capflow plugins`` and ``--help``.

Before Hydra runs, the command line is checked for mistakes (``capflow.mistakes``): a misspelt
key or option is one line naming the closest known ones, and nothing starts.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING

from capflow.errors import CapflowError

if TYPE_CHECKING:
    from capflow.plugins import PluginRegistry

EXIT_OK, EXIT_ROWS_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def main() -> None:
    """Entry point of the ``capflow`` console script."""
    argv = sys.argv[1:]
    if argv[:1] in (["--version"], ["-V"]):
        from capflow import __version__

        print(f"capflow {__version__}")
        sys.exit(EXIT_OK)
    problem = _secret_in_arguments(argv)
    if problem:  # before Hydra saves the overrides to disk
        print(f"capflow: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    if argv[:2] == ["plugins", "new"]:
        from capflow.scaffold import main as new_plugin

        sys.exit(new_plugin(argv[2:]))
    if argv[:1] == ["plugins"]:
        try:
            sys.exit(_plugins_command())
        except BrokenPipeError:  # `capflow plugins | head`
            sys.stderr.close()
            sys.exit(EXIT_OK)
    if argv[:1] == ["show"]:
        from capflow.show import main as show

        sys.exit(show(argv[1:]))
    if argv[:1] == ["models"]:
        from capflow.models_command import main as models

        sys.exit(models(argv[1:]))
    if argv[:1] == ["batches"]:
        from capflow.batches_command import main as batches

        sys.exit(batches(argv[1:]))
    if argv[:1] == ["compare"]:
        from capflow.compare_command import main as compare
        sys.exit(compare(argv[1:]))
    try:
        from capflow.plugins import get_plugins

        _, registry = get_plugins()
    except CapflowError as exc:
        print(f"capflow: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    for line in registry.broken_lines():  # the others run: say so once, by name
        print(f"capflow: warning: {line}", file=sys.stderr)
    if "--help" in argv or "-h" in argv:  # capflow's own, built from the YAML: no Hydra
        sys.exit(_help_command(registry))
    from capflow import mistakes, option_files

    try:
        argv = option_files.adopt(argv, list(mistakes.overrides(argv)), registry)
    except CapflowError as exc:
        print(f"capflow: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.argv[1:] = argv  # Hydra reads the options by the names given to the files
    problem = mistakes.check(argv, registry)
    if problem:
        if registry.broken:  # what is unknown may be what the plugin left out provides
            problem += f" (plugins not loaded: {', '.join(sorted(registry.broken))})"
        print(f"capflow: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_ERROR)

    import hydra

    from capflow import _hydra_bridge, sweep

    if "-m" in argv or "--multirun" in argv:
        sweep.remember_swept_keys(mistakes.overrides(argv))

    _hydra_bridge.install(registry)
    _hydra_bridge.skip_mode_probe(argv)
    started: list[bool] = []
    _hydra_bridge.report_in_one_line(lambda: bool(started))
    _hydra_bridge.show_resolved_config()
    statuses: list[int] = []

    @hydra.main(config_path="pkg://capflow.conf", config_name="config", version_base=None)
    def job(cfg) -> None:  # noqa: ANN001 - a DictConfig
        started.append(True)
        statuses.append(_run(cfg))
        if statuses[-1] == EXIT_INTERRUPTED:
            raise KeyboardInterrupt  # Ctrl-C stops a whole sweep, not just its current job

    try:
        job()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as exc:
        # Hydra exits 1 for a bad override or option before any job ran: that is a usage error.
        if exc.code not in (0, None) and not statuses:
            sys.exit(EXIT_ERROR)
        raise
    sys.exit(max(statuses, default=EXIT_OK))


def console() -> None:
    """The ``capflow`` console script: ``main()``, then a quick exit.

    A finished run has written and closed everything it owns; what the interpreter would do
    next, tearing down every module and object one by one, takes tens of milliseconds for a
    process that is ending anyway. Exit handlers still run and output is flushed; while any
    other thread still works, the exit is the usual one.
    """
    try:
        main()
        code: object = EXIT_OK
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = EXIT_OK
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = EXIT_ERROR
    import atexit
    import logging
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if run_exit_handlers is None or others:
        # Not CPython, or a thread (a plugin's, say) still at work: the usual way out, which
        # waits for it.
        sys.exit(code)
    run_exit_handlers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


def _secret_in_arguments(argv: list[str]) -> str | None:
    """A reason to refuse the command line: an API key typed where its variable's NAME goes."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~").endswith("key_name_of_api_key"):
            value = value.strip("'\"")
            if value and not value.replace("_", "").isalnum() or value.startswith("sk-"):
                return (f"{key} must be the NAME of an environment variable holding the key"
                        " (e.g. OPENAI_API_KEY), not the key itself")
    return None


def _run(cfg) -> int:  # noqa: ANN001 - a DictConfig
    from capflow import run_folder
    from capflow.app import run_job

    try:
        try:
            summaries = run_job(cfg)
        except CapflowError as exc:
            print(f"capflow: error: {exc}", file=sys.stderr)
            run_folder.note(f"capflow: error: {exc}")
            return EXIT_ERROR
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        if any(s.stopped == "interrupted" for s in summaries):
            return EXIT_INTERRUPTED
        for s in summaries:
            if s.stopped:
                print(f"capflow: stopped early: {s.stopped}", file=sys.stderr)
                run_folder.note(f"capflow: stopped early: {s.stopped}")
        return EXIT_OK if all(s.ok for s in summaries) else EXIT_ROWS_FAILED
    finally:
        run_folder.discard_if_nothing_ran()


def _help_command(registry: PluginRegistry) -> int:
    from capflow.help import render

    try:
        sys.stdout.write(render(registry))
        sys.stdout.flush()
    except BrokenPipeError:  # `capflow --help | head`
        sys.stderr.close()
    return EXIT_OK


def _plugins_command() -> int:
    from capflow.plugins import get_plugins

    try:
        pm, registry = get_plugins()
    except CapflowError as exc:
        print(f"capflow: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = next((d for p, d in pm.list_plugin_distinfo() if p is plugin), None)
        origin = f"{dist.project_name} {dist.version}" if dist else "built-in"
        provided = registry.provided_by(name)
        print(f"{name} ({origin})")
        for item in provided:
            print(f"    {item}")
    for name, why in sorted(registry.broken.items()):
        print(f"{name} (not loaded: {why})")
    builtin_options = registry.provided_by("capflow")
    print("capflow config (built-in)")
    for item in builtin_options:
        print(f"    {item}")
    return EXIT_OK
