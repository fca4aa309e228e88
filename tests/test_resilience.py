"""Never lose work, never pay twice: the response cache, resume, stop rules, rate limits."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import CAPFLOW, expected_caption, make_dataset, read_rows, run_capflow

from capflow.testing.faults import FaultConfig, FaultInjector
from capflow.testing.server import FakeOpenAIServer


def _args(server, data, out, *extra):
    return [f"input={data}", f"output={out}", f"api_url={server.base_url}", "model_name=m",
            *extra]


def _ok(server) -> int:
    return sum(1 for r in server.requests if r.status == 200)


def _check_captions(tmp_path, rows, written):
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    for original, row in zip(rows, written, strict=True):
        assert row["caption"] == expected_caption(tmp_path / original["image"][0])


def test_rerun_with_another_output_path_is_answered_by_the_cache(server, tmp_path):
    data, rows = make_dataset(tmp_path, 30)
    first = run_capflow(*_args(server, data, tmp_path / "a.jsonl"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_capflow(*_args(server, data, tmp_path / "b.json"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert len(server.requests) == 30
    assert "30 answered by the cache (30 stored)" in second.stdout
    _check_captions(tmp_path, rows, read_rows(tmp_path / "b.json"))
    # An unrelated field changing does not change what is asked, so still no request.
    text = data.read_text().replace('"taken": "2024-01-02"', '"taken": "2025-05-05"')
    data.write_text(text)
    third = run_capflow(*_args(server, data, tmp_path / "c.jsonl"), cwd=tmp_path)
    assert third.returncode == 0 and len(server.requests) == 30
    assert read_rows(tmp_path / "c.jsonl")[0]["taken"] == "2025-05-05"


@pytest.mark.parametrize(
    "change", ["prompt=concise", "model_name=other", "serving.temperature=0.5"]
)
def test_changing_prompt_model_or_parameters_misses_the_cache(server, tmp_path, change):
    data, _ = make_dataset(tmp_path, 5)
    assert run_capflow(*_args(server, data, tmp_path / "a.jsonl"), cwd=tmp_path).returncode == 0
    result = run_capflow(*_args(server, data, tmp_path / "b.jsonl"), change, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(server.requests) == 10


def test_another_endpoint_has_its_own_answers_unless_endpoints_share_them(server, tmp_path):
    data, _ = make_dataset(tmp_path, 5)
    out = tmp_path / "a.jsonl"
    assert run_capflow(*_args(server, data, out), cwd=tmp_path).returncode == 0
    with FakeOpenAIServer() as other:  # the same model, on another port
        again = run_capflow(*_args(other, data, out), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert len(other.requests) == 5  # neither the cache nor the journal answered
        assert "0 skipped" in again.stdout
    shared = "cache.share_endpoints=true"
    for n, port in enumerate(("first", "second")):
        with FakeOpenAIServer() as endpoint:
            result = run_capflow(*_args(endpoint, data, tmp_path / f"{port}.jsonl", shared),
                                 cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            assert len(endpoint.requests) == (5 if n == 0 else 0)  # the second shares answers


def test_cache_can_be_switched_off_and_moved(server, tmp_path):
    data, _ = make_dataset(tmp_path, 5)
    cache = tmp_path / "elsewhere" / "answers.sqlite"
    run_capflow(*_args(server, data, tmp_path / "a.jsonl", f"cache.path={cache}"), cwd=tmp_path)
    assert cache.exists() and not (tmp_path / "cache_local").exists()
    run_capflow(*_args(server, data, tmp_path / "b.jsonl", "cache.enabled=false"), cwd=tmp_path)
    assert len(server.requests) == 10


def test_rerun_of_a_finished_job_sends_nothing(server, tmp_path):
    data, rows = make_dataset(tmp_path, 50)
    args = _args(server, data, tmp_path / "out.jsonl", "cache.enabled=false")
    assert run_capflow(*args, cwd=tmp_path).returncode == 0
    again = run_capflow(*args, cwd=tmp_path)
    assert again.returncode == 0 and len(server.requests) == 50
    assert "50 skipped (already done)" in again.stdout
    _check_captions(tmp_path, rows, read_rows(tmp_path / "out.jsonl"))


def test_wrong_key_stops_within_the_first_failures(tmp_path):
    data, _ = make_dataset(tmp_path, 100)
    with FakeOpenAIServer(api_key="right", latency=0.05) as server:
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "max_workers=4"),
                             cwd=tmp_path, env={"CAPFLOW_API_KEY": "wrong"})
        sent = len(server.requests)
    assert result.returncode == 1
    assert sent <= 3 + 4  # the three that decide, plus what was already in flight
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("capflow: stopped early: every request fails with AuthenticationError")
    assert "Incorrect API key" in line and "key_name_of_api_key" in line


def test_wrong_model_stops_within_the_first_failures(tmp_path):
    data, _ = make_dataset(tmp_path, 100)
    with FakeOpenAIServer(models=["real"], latency=0.05) as server:
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "max_workers=4"),
                             cwd=tmp_path)
        assert len(server.requests) <= 7
    assert result.returncode == 1
    assert "every request fails with NotFound" in result.stdout
    assert "check model_name" in result.stdout


@pytest.mark.parametrize(("limit", "expected"), [("5", "6 rows failed"), ("0.3", "rows failed")])
def test_max_failures_stops_the_run_cleanly(server, tmp_path, limit, expected):
    data, _ = make_dataset(tmp_path, 80)
    for i in range(0, 80, 2):
        (tmp_path / "images" / f"{i:05d}.png").unlink()
    result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", f"max_failures={limit}",
                                "max_workers=2"), cwd=tmp_path)
    assert result.returncode == 1
    assert expected in result.stdout and f"max_failures={limit}" in result.stdout
    assert len(read_rows(tmp_path / "o.jsonl")) < 80


def test_token_budget_stops_the_run_and_a_rerun_continues(server, tmp_path):
    data, rows = make_dataset(tmp_path, 40)
    args = _args(server, data, tmp_path / "o.jsonl", "max_workers=1")
    result = run_capflow(*args, "max_tokens_total=500", cwd=tmp_path)
    assert result.returncode == 1
    assert "the token budget max_tokens_total=500 is spent" in result.stdout
    assert 1 <= len(server.requests) < 40
    spent = int(result.stdout.split(" completion = ")[1].split()[0].rstrip(","))
    assert spent <= 500  # requests that could pass the budget are not sent
    again = run_capflow(*args, cwd=tmp_path)
    assert again.returncode == 0
    _check_captions(tmp_path, rows, read_rows(tmp_path / "o.jsonl"))
    assert _ok(server) == 40


def test_cost_budget_uses_the_prices(server, tmp_path):
    data, _ = make_dataset(tmp_path, 40)
    result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "max_workers=1",
                                "max_cost=0.002", "price.prompt_per_million=2.0",
                                "price.completion_per_million=8.0"), cwd=tmp_path)
    assert result.returncode == 1 and "the budget max_cost=0.002 is spent" in result.stdout
    cost = float(result.stdout.split(", cost ")[1].split()[0])
    assert 0.001 < cost <= 0.002


def test_failed_rows_are_retried_on_rerun_unless_told_otherwise(tmp_path):
    data, rows = make_dataset(tmp_path, 10)
    out, failed = tmp_path / "o.jsonl", tmp_path / "failed.jsonl"
    with FakeOpenAIServer(faults=FaultConfig(rate_503=1.0)) as server:
        # adaptive=false: each row fails on its own, no circuit breaker holds them back.
        first = run_capflow(*_args(server, data, out, "retry.max_attempts=1", "adaptive=false",
                                   f"failed_output={failed}"), cwd=tmp_path)
        assert first.returncode == 1
        assert len(read_rows(failed)) == 10
        assert read_rows(failed)[0]["_error"]["type"] == "ServerError"
        server.faults = FaultInjector(None)  # the server is well again
        server.reset()
        kept = run_capflow(*_args(server, data, out, "retry_failed=false"), cwd=tmp_path)
        assert len(server.requests) == 0 and "10 skipped" in kept.stdout
        retried = run_capflow(*_args(server, data, out, f"failed_output={failed}"), cwd=tmp_path)
        assert len(server.requests) == 10 and retried.returncode == 0
    _check_captions(tmp_path, rows, read_rows(out))
    assert read_rows(failed) == []


def test_faulty_server_every_row_captioned_once(tmp_path):
    faults = FaultConfig(rate_429=0.10, retry_after=0.2, rate_500=0.05, rate_hang=0.01,
                         hang_seconds=3.0, rate_malformed=0.01, seed=7)
    data, rows = make_dataset(tmp_path, 300)
    with FakeOpenAIServer(latency=0.05, faults=faults) as server:
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "max_workers=32",
                                    "timeout=1", "retry.initial_wait=0.05", "retry.max_attempts=8"),
                             cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    _check_captions(tmp_path, rows, read_rows(tmp_path / "o.jsonl"))
    retries = int(result.stdout.split(" retries")[0].rsplit(" ", 1)[1])
    assert retries >= sum(server.stats()["faults"].values()) > 20


def test_rpm_is_smooth_and_draws_no_429(tmp_path):
    data, _ = make_dataset(tmp_path, 45)
    with FakeOpenAIServer(rpm_limit=600) as server:
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "rpm=600",
                                    "max_workers=16"), cwd=tmp_path)
        times = sorted(r.received_at for r in server.requests)
        statuses = {r.status for r in server.requests}
    assert result.returncode == 0, result.stdout
    assert statuses == {200}
    assert max(sum(1 for t in times if s <= t < s + 1) for s in times) <= 11
    rate = (len(times) - 1) / (times[-1] - times[0]) * 60
    assert 570 <= rate <= 630


def test_tpm_paces_requests_by_their_estimated_tokens(server, tmp_path):
    data, _ = make_dataset(tmp_path, 6)
    # Each request is estimated at about 270 tokens (a one-tile image plus text): 3 a second.
    result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "tpm=48600",
                                "max_workers=8"), cwd=tmp_path)
    assert result.returncode == 0
    times = sorted(r.received_at for r in server.requests)
    assert times[-1] - times[0] >= 1.4


def test_sigterm_stops_gracefully_and_the_rerun_finishes(tmp_path):
    data, rows = make_dataset(tmp_path, 60)
    with FakeOpenAIServer(latency=0.2) as server:
        args = [CAPFLOW, *_args(server, data, tmp_path / "o.jsonl", "max_workers=4")]
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while _ok(server) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # let the client take in those answers
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert "capflow stopped" in out and "interrupted" in out
        partial = read_rows(tmp_path / "o.jsonl")
        assert 0 < len(partial) < 60
        assert subprocess.run(args, cwd=tmp_path, capture_output=True).returncode == 0
        assert _ok(server) <= 60 + 4
    _check_captions(tmp_path, rows, read_rows(tmp_path / "o.jsonl"))


def test_an_unreachable_server_stops_the_run_quickly(tmp_path):
    import socket

    with socket.socket() as sock:  # a loopback port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data, _ = make_dataset(tmp_path, 200)
    started = time.monotonic()
    result = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}",
                         f"api_url=http://127.0.0.1:{port}/v1", "model_name=m",
                         "retry.initial_wait=0.05", cwd=tmp_path)
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert "the server cannot be reached" in result.stderr and "check api_url" in result.stderr


def test_ctrl_c_stops_a_whole_sweep(tmp_path):
    data, _ = make_dataset(tmp_path, 60)
    with FakeOpenAIServer(latency=0.2) as server:
        proc = subprocess.Popen(
            [CAPFLOW, "-m", "prompt=concise,detailed",
             *_args(server, data, "o.jsonl", "max_workers=2")],
            cwd=tmp_path, stdout=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 30
        while _ok(server) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        systems = {r.system for r in server.requests if r.system}  # abandoned ones have none
    assert proc.returncode == 130
    assert out.count("capflow stopped") == 1
    assert len(systems) == 1  # the second job never started


def test_requests_spread_over_several_endpoints(tmp_path):
    """api_url=[a,b]: each request goes to the endpoint with the fewest in flight, so a server
    twice as slow answers about half as many."""
    data, _ = make_dataset(tmp_path, 60)
    with FakeOpenAIServer(latency=0.02) as fast, FakeOpenAIServer(latency=0.08) as slow:
        urls = f"api_url=[{fast.base_url},{slow.base_url}]"
        result = run_capflow(f"input={data}", f"output={tmp_path / 'out.jsonl'}", urls,
                             "model_name=m", "max_workers=8", "adaptive=false", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert len(fast.requests) + len(slow.requests) == 60
        assert len(slow.requests) >= 5 and len(fast.requests) > 1.5 * len(slow.requests)
    rows = read_rows(tmp_path / "out.jsonl")
    assert all(r["caption"] == expected_caption(tmp_path / r["image"][0]) for r in rows)
