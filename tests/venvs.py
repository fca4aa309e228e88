"""Fresh virtual environments for tests that install plugin packages, offline.

A venv made here sees the environment running the tests (capflow, its dependencies, pytest,
pip) through a ``.pth`` file, and gets its own ``capflow`` console script from the
``capflow-cli`` fixture package; the packages under test are pip-installed into it with no index
and no build isolation, so nothing is downloaded and nothing is installed into the environment
running the tests.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_FIXTURE = ROOT / "tests" / "plugin_fixtures" / "capflow-cli"
PIP_FLAGS = ("--no-index", "--no-deps", "--no-build-isolation", "--disable-pip-version-check")


def clean_env() -> dict[str, str]:
    """The test's environment minus API keys and capflow, Python and pytest settings."""
    return {k: v for k, v in os.environ.items()
            if not k.endswith("_API_KEY")
            and k not in ("PYTHONPATH", "CAPFLOW_DISABLE_PLUGINS", "PYTEST_ADDOPTS")}


def run(*cmd: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command in the clean environment; returns its result."""
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def checked(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def listing(stdout: str) -> dict[str, list[str]]:
    """``capflow plugins`` output as {header line: the indented lines under it}."""
    blocks: dict[str, list[str]] = {}
    header = ""
    for line in stdout.splitlines():
        if line.startswith("    "):
            blocks[header].append(line.strip())
        elif line.strip():
            header = line
            blocks[header] = []
    return blocks


def copy_source(src: Path, dest_root: Path) -> Path:
    """Copy a package's source tree without build leftovers (building the copy leaves none in
    the repository); returns the copy."""
    dest = dest_root / src.name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    return dest


def make_venv(path: Path, packages: list[str | Path]) -> Path:
    """A fresh venv seeing this environment's packages, with the ``capflow`` console script
    and ``packages`` (pip arguments: paths, ``-e path``) installed; returns its ``bin``."""
    checked(run(sys.executable, "-m", "venv", "--without-pip", path, cwd=path.parent))
    python = path / "bin" / "python"
    own_site = checked(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                         "['purelib'])", cwd=path)).stdout.strip()
    # --system-site-packages would reach the base interpreter, not the environment running the
    # tests; addsitedir also runs that environment's .pth files (its editable capflow's).
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    (Path(own_site) / "_capflow_test_parent.pth").write_text(lines)
    cli = copy_source(CLI_FIXTURE, path.parent)
    checked(run(python, "-m", "pip", "install", *PIP_FLAGS, cli, *packages, cwd=path))
    return path / "bin"


def run_suites(python: Path, folders: dict[str, Path], timeout: float = 300,
               ) -> dict[str, tuple[int, str]]:
    """Each folder's own tests (``python -m pytest -q`` there, as its author would), all at
    once: exit status and output, by name."""
    started = {name: subprocess.Popen([str(python), "-m", "pytest", "-q", "-p",
                                       "no:cacheprovider"], cwd=folder, env=clean_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name, folder in folders.items()}
    results = {}
    for name, process in started.items():
        output, _ = process.communicate(timeout=timeout)
        results[name] = (process.returncode, output)
    return results
