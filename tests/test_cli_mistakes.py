"""Mistakes on the command line get one helpful line, exit status 2, and nothing starts; a
server's refusal names the setting behind it (the key variable, api_url's /v1)."""

from __future__ import annotations

import pytest
from conftest import make_dataset, read_rows, run_capflow

from capflow.mistakes import check
from capflow.plugins import ConfigRegistry, load_plugins
from capflow.testing.hostile import HostileServer
from capflow.testing.server import FakeOpenAIServer


def one_line_error(result) -> str:  # noqa: ANN001 - a CompletedProcess
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("capflow: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "expected"), [
    (["max_worker=5"], "unknown key max_worker: did you mean max_workers?"),
    (["+max_worker=5"], "unknown key max_worker: did you mean max_workers?"),
    (["serving.temprature=0.2"],
     "unknown key serving.temprature: did you mean serving.temperature?"),
    (["image.max_sid=800"], "unknown key image.max_sid: did you mean image.max_side?"),
    (["promt=concise"], "unknown key promt: did you mean prompt?"),
    (["serving=opnai"],
     "unknown option serving=opnai: did you mean serving=openai? (serving options:"
     " batch_file, openai, openai_batch)"),
    (["-m", "prompt=concise,detaild"], "unknown option prompt=detaild: did you mean"
     " prompt=detailed? (prompt options: alt_text, concise, detailed, ocr, seed,"
     " structured, tags)"),
    (["-m", "max_worker=5,6"], "unknown key max_worker: did you mean max_workers?"),
])
def test_a_misspelt_key_or_option_is_one_line_and_nothing_starts(server, tmp_path, args,
                                                                 expected):
    data, _ = make_dataset(tmp_path / "in", 2)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.jsonl"
    result = run_capflow(f"input={data}", f"output={out}", f"api_url={server.base_url}",
                         "model_name=m", *args, cwd=work)
    assert one_line_error(result) == f"capflow: error: {expected}"
    assert len(server.requests) == 0
    assert list(work.iterdir()) == []  # no output, journal, cache, .capflow/, outputs/


def test_an_example_plugins_option_says_how_to_install_it(tmp_path):
    line = one_line_error(run_capflow("serving=echo", cwd=tmp_path))
    assert "serving=echo comes from the example plugin: pip install -e " in line
    assert "plugins/capflow-echo" in line
    assert "serving options: batch_file, openai, openai_batch" in line


def test_a_value_below_a_null_node_says_to_add_it(tmp_path):
    line = one_line_error(run_capflow("serving.extra_body.top_k=20", cwd=tmp_path))
    assert line.endswith("serving.extra_body is null; add a key to it with"
                         " +serving.extra_body.top_k=...")


def test_additions_inside_a_node_are_allowed(tmp_path):
    result = run_capflow("--cfg", "job", "+serving.extra_body.top_k=20",
                         "++serving.extra_body.min_p=0.1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "    top_k: 20\n" in result.stdout and "    min_p: 0.1\n" in result.stdout


def test_adding_a_key_that_is_there_says_to_drop_the_plus(tmp_path):
    line = one_line_error(run_capflow("+max_workers=3", cwd=tmp_path))
    assert line == ("capflow: error: max_workers is already in the config: set it without the +"
                    " (max_workers=3)")


@pytest.mark.parametrize(("args", "expected"), [
    (["max_worker=5"], "capflow: error: unknown key max_worker: did you mean max_workers?"),
    (["serving=opnai"], "capflow: error: unknown option serving=opnai: did you mean"
     " serving=openai? (serving options: batch_file, openai, openai_batch)"),
    (["max_workers=["], "capflow: error: cannot read max_workers=[: no viable alternative at"
     " input '['"),
])
def test_mistakes_only_hydra_finds_are_one_line_too(tmp_path, args, expected):
    # A primary config of the user's own: capflow leaves the checking to Hydra, and rewrites
    # its errors.
    (tmp_path / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nmine: 1\n")
    result = run_capflow("-cd", str(tmp_path), "-cn", "mine", *args, cwd=tmp_path)
    assert one_line_error(result) == expected
    assert not (tmp_path / ".capflow").exists() and not (tmp_path / "outputs").exists()


# -- the checks in-process: what they let through ----------------------------------------------


@pytest.fixture(scope="module")
def registry():
    return load_plugins()[1]


@pytest.mark.parametrize("argv", [
    ["input=data.json", "max_workers=20", "serving.temperature=0.2", "image.max_side=800"],
    ["-m", "prompt=concise,detailed", "serving=openai"],
    ["prompt=glob(*)", "serving.extra_body={top_k: 20}", "~failed_output"],
    ["+serving.extra_body.top_k=20", "++serving.seed=3", "+pipeline.steps.caption.extra=1"],
    ["hydra.run.dir=x", "hydra.job.chdir=true", "hydra/launcher=basic"],
    ["--cfg", "job", "-p", "serving", "retry.max_attempts=2"],
    ["-cn", "mine", "my_own_key=1"],  # a primary config of the user's own: Hydra's to judge
])
def test_good_command_lines_pass(registry, argv):
    assert check(argv, registry) is None


def test_a_key_a_plugin_declares_at_the_top_level_may_be_added(tmp_path):
    tree = tmp_path / "conf" / "extras"
    tree.mkdir(parents=True)
    (tree / "knobs.yaml").write_text("# @package _global_\nmy_knob: 1\n")
    _, registry = load_plugins()
    ConfigRegistry(registry, "knobs").add_search_path(f"file://{tmp_path / 'conf'}")
    assert check(["+my_knob=2"], registry) is None
    assert check(["+my_knb=2"], registry) == "unknown key my_knb: did you mean my_knob?"
    assert check(["+other=2"], registry) == (
        "unknown key other (capflow --help lists the keys); + adds only config groups and keys"
        " that plugins declare")
    assert check(["extras=knobs"], registry) == (
        "extras is not chosen by default: add it with +extras=knobs")
    assert check(["+extras=knobs", "my_knob=3"], registry) is None


def test_a_reference_points_to_the_key_to_set(registry):
    assert check(["pipeline.steps.caption.image_io.max_side=3"], registry) == (
        "unknown key pipeline.steps.caption.image_io.max_side: pipeline.steps.caption.image_io"
        " is ${image}; did you mean image.max_side?")


# -- a server's refusal names the setting behind it --------------------------------------------


def test_no_key_line_on_a_keyless_run(server, tmp_path):
    data, _ = make_dataset(tmp_path, 2)
    result = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}",
                         f"api_url={server.base_url}", "model_name=m", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "CAPFLOW_API_KEY" not in result.stdout + result.stderr


def test_a_401_without_a_key_names_the_variable(tmp_path):
    data, _ = make_dataset(tmp_path, 4)
    out = tmp_path / "o.jsonl"
    hint = "the environment variable CAPFLOW_API_KEY is not set (key_name_of_api_key names it)"
    with FakeOpenAIServer(api_key="right") as server:
        stopped = run_capflow(f"input={data}", f"output={out}", f"api_url={server.base_url}",
                              "model_name=m", "cache.enabled=false", cwd=tmp_path)
        at_start = run_capflow(f"input={data}", f"api_url={server.base_url}", cwd=tmp_path)
    assert stopped.returncode == 1
    assert stopped.stderr.strip() == (
        "capflow: stopped early: every request fails with AuthenticationError: HTTP 401:"
        f" Incorrect API key provided: {hint}")
    assert read_rows(out)[0]["_error"]["message"].endswith(hint)
    assert one_line_error(at_start) == (
        f"capflow: error: the server refused a request without an API key: Incorrect API key"
        f" provided: {hint}")


def test_a_404_from_an_api_url_without_v1_suggests_it(tmp_path):
    data, _ = make_dataset(tmp_path, 4)
    with HostileServer("error", status=404, message="Not Found") as server:
        url = f"http://127.0.0.1:{server.port}"
        hint = f"api_url {url} does not end in /v1; did you mean {url}/v1?"
        stopped = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}", f"api_url={url}",
                              "model_name=m", "cache.enabled=false", cwd=tmp_path)
        at_start = run_capflow(f"input={data}", f"api_url={url}/", cwd=tmp_path)
        with_v1 = run_capflow(f"input={data}", f"output={tmp_path / 'v.jsonl'}",
                              f"api_url={url}/v1", "model_name=m", "cache.enabled=false",
                              cwd=tmp_path)
    assert stopped.returncode == 1
    assert stopped.stderr.strip() == (
        f"capflow: stopped early: every request fails with NotFound: HTTP 404: Not Found: {hint}")
    assert one_line_error(at_start) == (
        f"capflow: error: api_url {url}/ does not end in /v1; did you mean {url}/v1?"
        f" ({url}/models answered HTTP 404: Not Found)")
    assert "/v1?" not in with_v1.stderr and "check model_name" in with_v1.stderr

