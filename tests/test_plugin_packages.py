"""The plugin packages under plugins/: each installs into a fresh venv beside capflow, offline,
and its own tests (written against capflow's pytest kit alone) pass there; ``capflow plugins``
lists each with its version and what it provides.

Nothing is installed into the environment running the tests; the packages are copied first so
that building them leaves nothing in the repository.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from venvs import ROOT, checked, copy_source, make_venv, run, run_suites

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PACKAGES = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())
# What `capflow plugins` says each provides (entry-point name: lines under it).
PROVIDES = {
    "echo": ["serving echo", "serving=echo"],
    "parquet": ["storage parquet", "storage=parquet"],
    "webdataset": ["storage webdataset", "storage=webdataset"],
    "dedup": ["operator dedup", "pipeline=dedup_caption"],
    "metrics": ["metrics=files"],
    "ray": ["executor ray", "executor=ray"],
}
# Imports a package's tests need beyond capflow's own (the test extras install them).
NEEDS = {"capflow-parquet": "pyarrow", "capflow-dedup": "imagehash", "capflow-ray": "ray"}


def test_every_package_is_covered():
    names = {tomllib.loads((p / "pyproject.toml").read_text())["project"]["entry-points"]
             ["capflow"].popitem()[0] for p in PACKAGES}
    assert names == set(PROVIDES)


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plugin-sources")
    missing = [need for pkg, need in NEEDS.items() if importlib.util.find_spec(need) is None]
    if missing:
        pytest.skip(f"the plugin packages' tests need {', '.join(missing)}:"
                    " pip install -e '.[test]'")
    return {p.name: copy_source(p, root) for p in PACKAGES}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, copies: dict[str, Path]) -> Path:
    """The ``bin`` of one fresh venv with every package under plugins/ installed editable."""
    root = tmp_path_factory.mktemp("plugins-venv")
    return make_venv(root / "venv", [arg for p in copies.values() for arg in ("-e", p)])


@pytest.fixture(scope="module")
def own_tests(venv: Path, copies: dict[str, Path]) -> dict[str, tuple[int, str]]:
    with_tests = {name: path for name, path in copies.items() if (path / "tests").is_dir()}
    return run_suites(venv / "python", with_tests)


@pytest.mark.parametrize("package", [p.name for p in PACKAGES if (p / "tests").is_dir()])
def test_the_packages_own_tests_pass_in_a_fresh_venv(package, own_tests):
    status, output = own_tests[package]
    assert status == 0, output[-4000:]
    assert " passed" in output.splitlines()[-1]


def test_capflow_plugins_lists_each_package_with_its_version(venv, tmp_path):
    listing = checked(run(venv / "capflow", "plugins", cwd=tmp_path)).stdout
    for package in PACKAGES:
        project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
        (name,) = project["entry-points"]["capflow"]
        header = f"{name} ({project['name']} {project['version']})"
        assert header in listing, listing
        block = listing.split(header, 1)[1].split("\n\n", 1)[0]
        for line in PROVIDES[name]:
            assert line in block, (name, block)


def test_the_readme_examples_run_with_the_plugins_installed(venv, tmp_path):
    """The README's ``serving=echo`` example works once capflow-echo is installed."""
    result = run(venv / "capflow", "serving=echo", "output=out.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "echo:" in (tmp_path / "out.jsonl").read_text()
