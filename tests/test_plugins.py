"""Plugins: discovery through entry points, clashes, misspelt hooks, CAPFLOW_DISABLE_PLUGINS and
``capflow plugins``; in-process, and through real virtual environments with real pip installs.

Nothing is installed into the environment running the tests. Plugin packages (the example
``plugins/capflow-echo`` and the fixtures in ``tests/plugin_fixtures``) are copied to a temporary
folder first, so that building them leaves no ``build/`` or ``*.egg-info`` in the repository, and
then installed with ``pip --no-index --no-deps --no-build-isolation``:

- into a ``pip install --target`` folder put on ``sys.path`` for the in-process tests;
- into fresh venvs for the console-script tests. capflow and its dependencies come from the
  environment running the tests (itself often a venv), which a ``.pth`` file in the new venv adds
  as a site directory. A venv gets no scripts from elsewhere, so the ``capflow-cli`` fixture
  installs the ``capflow`` console script alone: the launcher pip writes for
  ``capflow = "capflow.cli:main"``, importing the running environment's capflow.

Third-party plugins are chosen per test with ``CAPFLOW_DISABLE_PLUGINS``.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from conftest import make_dataset, read_rows, run_capflow
from venvs import PIP_FLAGS, checked, copy_source, listing

import capflow
from capflow.errors import PluginError
from capflow.plugins import DEFAULT_PLUGINS, load_plugins

ROOT = Path(__file__).resolve().parents[1]
ECHO_SOURCE = ROOT / "plugins" / "capflow-echo"
FIXTURES = Path(__file__).resolve().parent / "plugin_fixtures"
# Entry-point names of the plugin packages installed into the shared --target folder and venv.
THIRD_PARTY = ("echo", "echoclash", "echonode", "misspelt", "broken")
FIXTURE_MODULES = ("capflow_echo", "capflow_echo_clash", "capflow_echo_node", "capflow_misspelt",
                   "capflow_echo_twin", "capflow_broken")
QUESTION = "Generate detailed captions based on image content."  # make_dataset's question
ECHO_CAPTION = f"echo: {QUESTION} (1 images)"  # capflow-echo's answer for a one-image row
NODE_CAPTION = f"node: {QUESTION} (1 images)"  # the same serving through capflow-echo-node
N_ROWS = 3


def only(*names: str) -> str:
    """A CAPFLOW_DISABLE_PLUGINS value leaving just ``names`` of the fixture plugins on."""
    return ",".join(n for n in THIRD_PARTY if n not in names)


def clash_pair(message: str, kind: str) -> set[str]:
    """The two plugin names a clash message (``...: 'a' and 'b'``) names."""
    match = re.search(rf"two plugins {kind}.*: '([^']+)' and '([^']+)'$", message)
    assert match, message
    return {match[1], match[2]}


def config_groups(help_text: str) -> dict[str, str]:
    """The ``group: option, option`` lines of ``capflow --help``."""
    section = help_text.split("== Config groups", 1)[1].split("== Config (", 1)[0]
    return dict(line.split(": ", 1) for line in section.splitlines()[1:] if ": " in line)


def run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command with the test's environment minus API keys and capflow/Python settings."""
    full_env = {
        k: v for k, v in os.environ.items()
        if not k.endswith("_API_KEY") and k not in ("PYTHONPATH", "CAPFLOW_DISABLE_PLUGINS")
    }
    full_env.update(env or {})
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class Venv:
    path: Path

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    def pip(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return checked(run(self.bin / "pip", *args, cwd=self.path))

    def capflow(self, *args: str | Path, cwd: Path, disable: str = "",
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {"CAPFLOW_DISABLE_PLUGINS": disable, **(env or {})}
        return run(self.bin / "capflow", *args, cwd=cwd, env=env)

    def python(self, code: str) -> str:
        return checked(run(self.bin / "python", "-c", code, cwd=self.path)).stdout


def make_venv(path: Path, cli_source: Path) -> Venv:
    checked(run(sys.executable, "-m", "venv", path, cwd=path.parent))
    venv = Venv(path)
    # --system-site-packages would reach the base interpreter, not the environment running the
    # tests; addsitedir also runs that environment's .pth files (editable installs among them).
    own_site = venv.python("import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    (Path(own_site) / "_capflow_test_parent.pth").write_text(lines)
    venv.pip("install", *PIP_FLAGS, cli_source)
    assert (venv.bin / "capflow").is_file()
    return venv


# -- module fixtures: sources, install folders, venvs, a dataset --------------------------------


@pytest.fixture(scope="module", autouse=True)
def _base_is_clean() -> None:
    """The environment running the tests must have no third-party capflow plugin installed:
    what the venvs see would otherwise not be what they install."""
    found = [f"{ep.name} = {ep.value}" for ep in metadata.entry_points(group="capflow")]
    try:
        echo = metadata.distribution("capflow-echo")
    except metadata.PackageNotFoundError:
        echo = None
    if found or echo is not None:
        pytest.fail(
            f"the base environment ({sys.prefix}) must not have capflow plugins installed; "
            f"found entry points {found}, capflow-echo "
            f"{'installed' if echo else 'not installed'}: pip uninstall them first",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of capflow-echo and of every fixture package, by distribution name."""
    root = tmp_path_factory.mktemp("sources")
    found = {"capflow-echo": copy_source(ECHO_SOURCE, root)}
    for src in sorted(FIXTURES.iterdir()):
        if (src / "pyproject.toml").is_file():
            found[src.name] = copy_source(src, root)
    return found


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    """A folder with capflow-echo and the clashing/misspelt fixture plugins pip-installed."""
    target = tmp_path_factory.mktemp("site")
    names = ("capflow-echo", "capflow-echo-clash", "capflow-echo-node", "capflow-misspelt",
             "capflow-broken")
    checked(run(sys.executable, "-m", "pip", "install", *PIP_FLAGS, "--target", target,
                *(sources[n] for n in names), cwd=target))
    return target


@pytest.fixture(scope="module")
def echo_venv(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Venv:
    """A fresh venv with nothing but the capflow console script; tests install into it."""
    return make_venv(tmp_path_factory.mktemp("echo-venv") / "venv", sources["capflow-cli"])


@pytest.fixture(scope="module")
def clash_venv(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Venv:
    """A venv with capflow-echo and the clashing and misspelt fixture plugins installed."""
    venv = make_venv(tmp_path_factory.mktemp("clash-venv") / "venv", sources["capflow-cli"])
    names = ("capflow-echo", "capflow-echo-clash", "capflow-echo-node", "capflow-misspelt",
             "capflow-broken")
    venv.pip("install", *PIP_FLAGS, *(sources[n] for n in names))
    return venv


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    return make_dataset(tmp_path_factory.mktemp("dataset"), N_ROWS, name="data.jsonl")


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch, plugin_dir: Path) -> Iterator[pytest.MonkeyPatch]:
    """Make the --target folder's plugins visible to this process (as if installed)."""
    monkeypatch.delenv("CAPFLOW_DISABLE_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield monkeypatch
    for name in list(sys.modules):
        if name.split(".")[0] in FIXTURE_MODULES:
            del sys.modules[name]


# -- in-process: load_plugins() over real installed distributions -------------------------------


def test_two_plugins_registering_one_serving_name_is_an_error(on_path):
    on_path.setenv("CAPFLOW_DISABLE_PLUGINS", only("echo", "echoclash"))
    with pytest.raises(PluginError) as err:
        load_plugins()
    assert "serving 'echo'" in str(err.value)
    assert clash_pair(str(err.value), "register the serving") == {"echo", "echoclash"}


def test_two_plugins_providing_one_config_option_is_an_error(on_path):
    # capflow-echo ships serving/echo.yaml; capflow-echo-node adds serving=echo as a typed node.
    on_path.setenv("CAPFLOW_DISABLE_PLUGINS", only("echo", "echonode"))
    with pytest.raises(PluginError) as err:
        load_plugins()
    assert "config option serving=echo" in str(err.value)
    assert clash_pair(str(err.value), "provide the config option") == {"echo", "echonode"}


def test_misspelt_hook_is_an_error(on_path):
    on_path.setenv("CAPFLOW_DISABLE_PLUGINS", only("misspelt"))
    with pytest.raises(PluginError) as err:
        load_plugins()
    assert "capflow_register_servngs" in str(err.value)
    assert "capflow_misspelt" in str(err.value)


def test_plugins_load_and_say_what_they_provide(on_path):
    on_path.setenv("CAPFLOW_DISABLE_PLUGINS", only("echo"))
    pm, registry = load_plugins()
    assert pm.get_plugin("echo") is sys.modules["capflow_echo"]
    assert registry.provided_by("echo") == ["serving echo", "serving=echo"]
    assert registry.search_paths == ["pkg://capflow_echo.conf"]
    assert registry.provided_by("capflow.serving.plugin") == [
        "serving openai", "serving openai_batch", "serving batch_file"]


def test_disabling_one_plugin_switches_off_only_that_one(on_path):
    # echo and echonode clash over serving=echo; with echo off, echonode alone provides it.
    on_path.setenv("CAPFLOW_DISABLE_PLUGINS", " echo , echoclash,misspelt")
    pm, registry = load_plugins()
    assert pm.is_blocked("echo") and pm.get_plugin("echo") is None
    assert pm.get_plugin("echonode") is not None
    assert registry.options[("serving", "echo")] == "echonode"
    assert "echo" not in registry.components["serving"]
    assert [(g, n) for g, n, _ in registry.nodes] == [("serving", "echo")]
    # echonode registers the class it builds (capflow_echo's, imported as a library): the run
    # may use it through echonode, not through the disabled echo.
    echo_serving = sys.modules["capflow_echo"].EchoServing
    assert registry.components["serving"] == {
        "openai": registry.components["serving"]["openai"],
        "openai_batch": registry.components["serving"]["openai_batch"],
        "batch_file": registry.components["serving"]["batch_file"],
        "echonode": (echo_serving, "echonode")}


def test_a_plugin_that_fails_to_import_is_left_out_by_name(on_path):
    on_path.setenv("CAPFLOW_DISABLE_PLUGINS", only("echo", "broken"))
    pm, registry = load_plugins()
    assert pm.get_plugin("echo") is sys.modules["capflow_echo"]  # the others load
    assert registry.broken == {"broken": "capflow-broken 0.1.0: ImportError: No module named"
                                         " 'capflow_broken_dependency'"}
    assert registry.broken_lines() == [
        "plugin 'broken' could not be loaded and is left out (capflow-broken 0.1.0:"
        " ImportError: No module named 'capflow_broken_dependency')"]


def test_disable_all_switches_off_every_third_party_plugin_but_no_builtin(on_path):
    # The misspelt and clashing plugins are installed too: "all" must not load any of them.
    on_path.setenv("CAPFLOW_DISABLE_PLUGINS", "all")
    pm, registry = load_plugins()
    assert [name for name, plugin in pm.list_name_plugin() if plugin is not None] == list(
        DEFAULT_PLUGINS
    )
    assert {kind: sorted(known) for kind, known in registry.components.items()} == {
        "storage": ["file"], "serving": ["batch_file", "openai", "openai_batch"],
        "operator": ["prompted_vqa", "row_filter"],
        "executor": ["local"],
    }
    assert set(registry.options.values()) == {"capflow"}
    assert not [m for m in FIXTURE_MODULES if m in sys.modules]


def test_two_distributions_with_one_entry_point_name_is_an_error(
    on_path, sources, tmp_path
):
    checked(run(sys.executable, "-m", "pip", "install", *PIP_FLAGS, "--target", tmp_path,
                sources["capflow-echo-twin"], cwd=tmp_path))
    on_path.syspath_prepend(str(tmp_path))
    on_path.setenv("CAPFLOW_DISABLE_PLUGINS", only("echo"))
    with pytest.raises(PluginError) as err:
        load_plugins()
    assert "capflow-echo" in str(err.value) and "capflow-echo-twin" in str(err.value)


# -- the base environment's console script ------------------------------------------------------


def test_capflow_plugins_lists_builtins_and_what_they_provide(tmp_path):
    result = run_capflow("plugins", cwd=tmp_path, env={"CAPFLOW_DISABLE_PLUGINS": ""})
    assert result.returncode == 0, result.stderr
    blocks = listing(result.stdout)
    assert blocks.pop("capflow.storage.plugin (built-in)") == ["storage file"]
    assert blocks.pop("capflow.serving.plugin (built-in)") == [
        "serving openai", "serving openai_batch", "serving batch_file"]
    assert blocks.pop("capflow.operators.plugin (built-in)") == [
        "operator prompted_vqa", "operator row_filter"]
    assert blocks.pop("capflow.executors.plugin (built-in)") == ["executor local"]
    builtin_config = blocks.pop("capflow config (built-in)")
    assert {"serving=openai", "storage=file", "pipeline=caption", "prompt=seed", "executor=local",
            "prompt=concise", "prompt=detailed", "prompt=alt_text"} <= set(builtin_config)
    assert blocks == {}  # no third-party plugin in the base environment


# -- acceptance: install capflow-echo into a fresh venv, use it, uninstall it -------------------


@pytest.mark.parametrize("mode", ["regular", "editable"])
def test_install_use_and_uninstall_the_echo_plugin(echo_venv, sources, dataset, tmp_path, mode):
    venv, data = echo_venv, dataset[0]
    where = ("import capflow, importlib.util as u; s = u.find_spec('capflow_echo'); "
             "print(capflow.__file__); print(s.origin if s else None)")
    # capflow comes from the base environment; capflow-echo is not installed yet.
    assert venv.python(where).split() == [capflow.__file__, "None"]
    assert config_groups(checked(venv.capflow("--help", cwd=tmp_path)).stdout)["serving"] == (
        "batch_file, openai, openai_batch"
    )

    source = sources["capflow-echo"]
    venv.pip("install", *PIP_FLAGS, *(["-e"] if mode == "editable" else []), source)
    try:
        origin = Path(venv.python(where).split()[1])
        home = source if mode == "editable" else venv.path / "lib"
        assert home in origin.parents, origin

        out = tmp_path / "out.jsonl"
        result = venv.capflow("serving=echo", f"input={data}", f"output={out}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        rows = read_rows(out)
        assert [r["caption"] for r in rows] == [ECHO_CAPTION] * N_ROWS
        assert [{k: v for k, v in r.items() if k != "caption"} for r in rows] == dataset[1]

        listed = checked(venv.capflow("plugins", cwd=tmp_path)).stdout
        assert "echo (capflow-echo 0.1.0)" in listed.splitlines()
        assert listing(listed)["echo (capflow-echo 0.1.0)"] == ["serving echo", "serving=echo"]
        help_text = checked(venv.capflow("--help", cwd=tmp_path)).stdout
        assert "serving: batch_file, echo, openai, openai_batch" in help_text.splitlines()
    finally:
        venv.pip("uninstall", "-y", "capflow-echo")

    out = tmp_path / "after.jsonl"
    result = venv.capflow("serving=echo", f"input={data}", f"output={out}", cwd=tmp_path)
    assert result.returncode != 0
    assert "serving=echo comes from the example plugin" in result.stderr, result.stderr
    assert not out.exists()
    help_text = checked(venv.capflow("--help", cwd=tmp_path)).stdout
    assert config_groups(help_text)["serving"] == "batch_file, openai, openai_batch"
    listed = checked(venv.capflow("plugins", cwd=tmp_path)).stdout
    assert not [h for h in listing(listed) if h.startswith("echo ")]


# -- clashes and misspelt hooks across installed packages ---------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("capflow: error: "), result.stderr
    return lines[0]


def test_serving_clash_across_packages_stops_the_console_script(clash_venv, dataset, tmp_path):
    out = tmp_path / "out.jsonl"
    for args in (["serving=echo", f"input={dataset[0]}", f"output={out}"], ["plugins"]):
        result = clash_venv.capflow(*args, cwd=tmp_path, disable=only("echo", "echoclash"))
        error = assert_one_line_error(result)
        assert clash_pair(error, "register the serving") == {"echo", "echoclash"}
    assert not out.exists()


def test_config_option_clash_across_packages_stops_the_console_script(
    clash_venv, dataset, tmp_path
):
    result = clash_venv.capflow("serving=echo", f"input={dataset[0]}", cwd=tmp_path,
                                disable=only("echo", "echonode"))
    error = assert_one_line_error(result)
    assert "serving=echo" in error
    assert clash_pair(error, "provide the config option") == {"echo", "echonode"}


def test_console_script_reports_a_misspelt_hook(clash_venv, dataset, tmp_path):
    for args in (["serving=echo", f"input={dataset[0]}"], ["plugins"]):
        result = clash_venv.capflow(*args, cwd=tmp_path, disable=only("echo", "misspelt"))
        error = assert_one_line_error(result)
        assert "capflow_register_servngs" in error


def test_console_script_honours_disabled_plugins(clash_venv, dataset, tmp_path):
    # Everything installed at once fails (the misspelt hook is found first) ...
    assert "capflow_register_servngs" in assert_one_line_error(
        clash_venv.capflow("plugins", cwd=tmp_path)
    )
    # ... "all" leaves the built-ins only ...
    listed = checked(clash_venv.capflow("plugins", cwd=tmp_path, disable="all")).stdout
    assert all(h.endswith("(built-in)") for h in listing(listed)), listed
    help_text = checked(clash_venv.capflow("--help", cwd=tmp_path, disable="all")).stdout
    assert config_groups(help_text)["serving"] == "batch_file, openai, openai_batch"
    # ... and naming the others leaves one plugin on, which works.
    out = tmp_path / "out.jsonl"
    result = clash_venv.capflow("serving=echo", f"input={dataset[0]}", f"output={out}",
                                cwd=tmp_path, disable=only("echo"))
    assert result.returncode == 0, result.stderr
    assert [r["caption"] for r in read_rows(out)] == [ECHO_CAPTION] * N_ROWS
    listed = checked(clash_venv.capflow("plugins", cwd=tmp_path, disable=only("echo"))).stdout
    assert [h for h in listing(listed) if not h.endswith("(built-in)")] == [
        "echo (capflow-echo 0.1.0)"
    ]


def run_with_events(venv: Venv, data: Path, out: Path, cwd: Path) -> tuple[str, list[dict]]:
    """Run serving=echo from capflow-echo-node's typed node; returns stdout and hook events."""
    events = cwd / "events.jsonl"
    events.unlink(missing_ok=True)
    result = venv.capflow("serving=echo", f"input={data}", f"output={out}", cwd=cwd,
                          disable=only("echonode"), env={"CAPFLOW_FIXTURE_EVENTS": str(events)})
    assert result.returncode == 0, result.stderr
    return result.stdout, [json.loads(line) for line in events.read_text().splitlines()]


def test_typed_node_option_and_observer_hooks(clash_venv, dataset, tmp_path):
    out = tmp_path / "out.jsonl"
    _, events = run_with_events(clash_venv, dataset[0], out, tmp_path)
    assert [r["caption"] for r in read_rows(out)] == [NODE_CAPTION] * N_ROWS
    start, *rows, end = events
    assert start == {"hook": "run_start", "serving": "EchoServing",
                     "operator": "PromptedVQAGenerator", "rows": N_ROWS, "dry_run": False}
    assert sorted(e["index"] for e in rows) == list(range(N_ROWS))
    assert all(e["hook"] == "row_finished" and e["error"] is None
               and e["row"]["caption"] == NODE_CAPTION for e in rows)
    assert end == {"hook": "run_end", "done": N_ROWS, "failed": 0, "skipped": 0, "rows": N_ROWS}


def test_rows_skipped_on_resume_are_only_counted(clash_venv, dataset, tmp_path):
    out = tmp_path / "out.jsonl"
    run_with_events(clash_venv, dataset[0], out, tmp_path)
    _, events = run_with_events(clash_venv, dataset[0], out, tmp_path)
    assert events[-1] == {"hook": "run_end", "done": 0, "failed": 0, "skipped": N_ROWS,
                          "rows": N_ROWS}
    assert not [e for e in events if e["hook"] == "row_finished"]


def test_console_script_runs_on_without_a_plugin_that_fails_to_import(clash_venv, dataset,
                                                                      tmp_path):
    out = tmp_path / "out.jsonl"
    disable = only("echo", "broken")
    result = clash_venv.capflow("serving=echo", f"input={dataset[0]}", f"output={out}",
                                cwd=tmp_path, disable=disable)
    assert result.returncode == 0, result.stderr
    assert [r["caption"] for r in read_rows(out)] == [ECHO_CAPTION] * N_ROWS
    warnings = [line for line in result.stderr.splitlines() if "broken" in line]
    assert warnings == ["capflow: warning: plugin 'broken' could not be loaded and is left out"
                        " (capflow-broken 0.1.0: ImportError: No module named"
                        " 'capflow_broken_dependency')"]
    listed = checked(clash_venv.capflow("plugins", cwd=tmp_path, disable=disable)).stdout
    assert "broken (not loaded: capflow-broken 0.1.0: ImportError: No module named" in listed
    # A run that needs what the plugin would have provided says which plugin is missing.
    needs = clash_venv.capflow("serving=brokenthing", f"input={dataset[0]}", cwd=tmp_path,
                               disable=disable)
    assert needs.returncode == 2
    assert needs.stderr.strip().splitlines()[-1].endswith("(plugins not loaded: broken)")
