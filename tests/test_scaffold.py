"""``capflow plugins new``: the package it writes for each kind is complete.

Each kind's package is generated into a temporary folder and installed, editable and offline,
into one fresh venv (capflow and its dependencies come from the environment running the tests,
through a ``.pth`` file, as in ``test_plugins.py``); there its own tests must pass unchanged and
``capflow plugins`` must list it with what it provides. The packages are also ruff-clean under
capflow's own config, even with the longest name allowed. Bad names and occupied targets are
one-line errors with exit status 2, and nothing is written.

Nothing is installed into the environment running the tests.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import run_capflow
from venvs import checked, listing, make_venv, run, run_suites

from capflow.scaffold import KINDS, MAX_NAME, main, new_plugin

ROOT = Path(__file__).resolve().parents[1]
# One name per kind, with "-" and "_" in some: they reach the module, option and group names.
NAMES = {"serving": "img-size", "storage": "text_list", "operator": "file-size",
         "observer": "run-log"}
PROVIDES = {
    "serving": ["serving img-size", "serving=img-size"],
    "storage": ["storage text_list", "storage=text_list"],
    "operator": ["operator file-size", "pipeline=file-size"],
    "observer": ["run-log=on"],
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One package per kind, by kind."""
    root = tmp_path_factory.mktemp("generated")
    return {kind: new_plugin(name, root, kind)[0].parent for kind, name in NAMES.items()}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, generated: dict[str, Path]) -> Path:
    """The ``bin`` folder of one venv with all four generated packages installed editable."""
    root = tmp_path_factory.mktemp("scaffold-venv")
    editable = [arg for path in generated.values() for arg in ("-e", path)]
    return make_venv(root / "venv", editable)


@pytest.fixture(scope="module")
def own_tests(venv: Path, generated: dict[str, Path]) -> dict[str, tuple[int, str]]:
    """Each package's own tests, run in the venv from the package's folder as a user would
    (``python -m pytest -q``), all four at once: their exit status and output, by kind."""
    return run_suites(venv / "python", generated)


# -- the generated packages, installed ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_generated_tests_pass_once_installed(kind, own_tests):
    returncode, output = own_tests[kind]
    assert returncode == 0, output
    assert "2 passed" in output, output


def test_capflow_plugins_lists_each_with_its_version_and_what_it_provides(venv, tmp_path):
    blocks = listing(checked(run(venv / "capflow", "plugins", cwd=tmp_path)).stdout)
    for kind, name in NAMES.items():
        dist = f"capflow-{name.replace('_', '-')}"  # the normalized name: text_list, text-list
        assert blocks.get(f"{name} ({dist} 0.1.0)") == PROVIDES[kind], blocks


def test_an_installed_plugins_own_package_may_be_written_again(venv, tmp_path):
    # img-size is installed in the venv: its name is its own, not another plugin's.
    again = run(venv / "capflow", "plugins", "new", "img-size", "--dir", "x", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "x/capflow-img-size/pyproject.toml").is_file()


def test_the_packages_ship_what_they_need(generated):
    serving = generated["serving"]
    pyproject = (serving / "pyproject.toml").read_text()
    assert '[project.entry-points.capflow]\nimg-size = "capflow_img_size"' in pyproject
    assert 'include = ["capflow_img_size*"]' in pyproject  # the module and its conf/ tree
    assert '"*" = ["*.yaml"]' in pyproject  # the options ship as package data
    readme = (serving / "README.md").read_text()
    assert f"pip install -e {serving}" in readme
    assert "capflow serving=img-size input=data.jsonl output=out.jsonl" in readme
    assert (generated["operator"] / "capflow_file_size/conf/pipeline/file-size.yaml").is_file()
    assert (generated["observer"] / "capflow_run_log/conf/run-log/on.yaml").is_file()
    assert not list(serving.glob("**/conftest.py"))  # the kit's fixtures need none


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed")
def test_the_packages_are_ruff_clean_even_with_the_longest_name(generated, tmp_path):
    longest = "abcdefghij-klmnopqrs-tuvwxyz0123456789"[:MAX_NAME]
    for number, kind in enumerate(KINDS):
        new_plugin(f"{longest[:-1]}{number}", tmp_path, kind)
    # From the repository, as its own files are checked: capflow is first-party there.
    result = run(sys.executable, "-m", "ruff", "check", "--config", ROOT / "pyproject.toml",
                 tmp_path, *generated.values(), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the command line ----------------------------------------------------------------------------


def test_the_command_writes_the_package_and_says_what_next(tmp_path):
    result = run_capflow("plugins", "new", "mine", "--dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("Wrote capflow-mine, a capflow plugin adding serving=mine (serving),"
                        " in out/capflow-mine:")
    assert "    out/capflow-mine/capflow_mine/conf/serving/mine.yaml" in lines
    assert "    pip install -e out/capflow-mine    # into the environment capflow runs in" in lines
    assert "    cd out/capflow-mine && python -m pytest -q" in lines
    assert any(line.startswith("    capflow plugins    # lists mine (capflow-mine 0.1.0)")
               for line in lines)
    assert (tmp_path / "out/capflow-mine/capflow_mine/__init__.py").is_file()


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``capflow plugins new`` in-process; it must fail with one line and status 2."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1, captured
    assert lines[0].startswith("capflow: error: ")
    return lines[0]


@pytest.mark.parametrize("name", ["Echo", "1echo", "my--echo", "echo-", "my echo", "e.cho",
                                  "x" * (MAX_NAME + 1), ""])
def test_an_invalid_name_is_a_one_line_error(capsys, tmp_path, name):
    error = one_line_error(capsys, [name, "--dir", str(tmp_path)])
    assert f"invalid plugin name {name!r}" in error
    assert list(tmp_path.iterdir()) == []


def test_the_capflow_prefix_is_left_out(capsys, tmp_path):
    error = one_line_error(capsys, ["capflow-echo", "--dir", str(tmp_path)])
    assert "NAME is 'echo'" in error


@pytest.mark.parametrize(("name", "kind", "says"), [
    ("openai", "serving", "serving=openai comes from capflow itself"),
    ("file", "storage", "storage=file comes from capflow itself"),
    ("caption", "operator", "pipeline=caption comes from capflow itself"),
    ("image", "observer", "the config already has a key or group named 'image'"),
])
def test_a_name_capflow_uses_is_refused(capsys, tmp_path, name, kind, says):
    error = one_line_error(capsys, [name, "--dir", str(tmp_path), "--kind", kind])
    assert f"the name {name!r} is taken" in error and says in error


def test_a_name_another_installed_plugin_has_is_refused(capsys, tmp_path, monkeypatch):
    # A distribution of another name announcing the plugin name "shiny" (never imported here).
    info = tmp_path / "site" / "capflow_other-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: capflow-other\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[capflow]\nshiny = capflow_other\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    error = one_line_error(capsys, ["shiny", "--dir", str(tmp_path), "--kind", "observer"])
    assert error == ("capflow: error: the name 'shiny' is taken: the installed distribution"
                     " 'capflow-other' has a plugin of that name")
    assert not (tmp_path / "capflow-shiny").exists()


def test_a_non_empty_target_is_refused_and_left_alone(capsys, tmp_path):
    target = tmp_path / "capflow-echo"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    error = one_line_error(capsys, ["echo", "--dir", str(tmp_path)])
    assert f"{target} already exists and is not empty" in error
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_an_empty_target_is_used(capsys, tmp_path):
    (tmp_path / "capflow-echo").mkdir()
    assert main(["echo", "--dir", str(tmp_path), "--kind", "observer"]) == 0
    assert (tmp_path / "capflow-echo/capflow_echo/conf/echo/on.yaml").is_file()


@pytest.mark.parametrize("argv", [["echo"], ["echo", "--dir", ".", "--kind", "sink"], []])
def test_usage_mistakes_are_one_line_errors(capsys, tmp_path, argv):
    error = one_line_error(capsys, argv)
    assert "(usage: capflow plugins new NAME --dir DIR" in error
