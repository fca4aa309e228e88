"""serving=openai_batch: rows answered through the Batch API of the loopback test server; no
live request, no line answered twice, resumable after a kill, failed lines resubmitted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from conftest import CAPFLOW, expected_caption, make_dataset, read_rows, run_capflow

from capflow.testing.server import FakeOpenAIServer


def batch_args(server: FakeOpenAIServer, data, out, *extra: str) -> list[str]:  # noqa: ANN001
    return [f"input={data}", f"output={out}", "serving=openai_batch",
            f"api_url={server.base_url}", "model_name=m", "serving.poll_interval=0.2",
            "serving.flush_after=0.2", "progress=false", *extra]


def answered_once(server: FakeOpenAIServer) -> bool:
    return all(n == 1 for n in server.batch_lines_answered.values())


def test_500_rows_through_batches_with_failed_lines_resubmitted(server, tmp_path):
    data, _ = make_dataset(tmp_path, 500)
    server.batch_latency = 0.1
    server.set_batch_faults(0.1, seed=3)  # a tenth of the lines fail in their first batch
    out = tmp_path / "out.jsonl"
    result = run_capflow(*batch_args(server, data, out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 500
    for row in rows:  # each from its own image
        assert row["caption"] == expected_caption(tmp_path / row["image"][0])
    assert server.requests == []  # not one live chat request
    assert answered_once(server) and len(server.batch_lines_answered) == 500
    assert len(server.batches_submitted) >= 2  # the failed lines went in a batch of their own


def test_a_kill_during_a_batch_resumes_by_polling_it(server, tmp_path):
    data, _ = make_dataset(tmp_path, 40)
    server.batch_latency = 4.0
    out = tmp_path / "out.jsonl"
    args = [CAPFLOW, *batch_args(server, data, out)]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    job = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not server.batches_submitted and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the batch is in progress on the server
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert len(server.batches_submitted) == 1 and not out.exists()
    server.batch_latency = 0.1
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(server.batches_submitted) == 1  # polled, not submitted again
    assert "submitted by an earlier run" in again.stdout + again.stderr
    rows = read_rows(out)
    assert len(rows) == 40 and all(r["caption"] for r in rows)
    assert answered_once(server) and server.requests == []


def test_an_expired_batch_is_resubmitted_and_lines_failing_too_often_are_row_errors(
        server, tmp_path):
    data, _ = make_dataset(tmp_path, 12)
    server.batch_latency = 0.05
    server.set_batch_faults(expire_next=1, expire_after=5)
    out = tmp_path / "out.jsonl"
    result = run_capflow(*batch_args(server, data, out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(server.batches_submitted) == 2  # the expired one's rest went again, once
    assert all(r["caption"] for r in read_rows(out)) and answered_once(server)

    server.reset()
    server.set_batch_faults(1.0, attempts=9)  # every line fails, batch after batch
    out2 = tmp_path / "out2.jsonl"
    # Another cache and ledger: the first run's answers, kept there, would answer these rows.
    result = run_capflow(*batch_args(server, data, out2, "serving.max_batch_attempts=2",
                                     "cache.path=other/responses.sqlite"), cwd=tmp_path)
    assert result.returncode == 1
    rows = read_rows(out2)
    assert all(r["_error"]["type"] == "ServerError" for r in rows)
    assert all("after 2 batches" in r["_error"]["message"] for r in rows)
    assert len(server.batches_submitted) == 2


def test_files_over_the_limits_are_split_into_several_batches(server, tmp_path):
    data, _ = make_dataset(tmp_path, 30)
    server.batch_latency = 0.05
    out = tmp_path / "out.jsonl"
    result = run_capflow(*batch_args(server, data, out, "serving.max_requests_per_batch=7",
                                     "price.prompt_per_million=2",
                                     "price.completion_per_million=8"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # Half the live price, and the other half shown as saved.
    cost = re.search(r"cost (\d+\.\d+) \(batch price; (\d+\.\d+) less than live", result.stdout)
    assert cost and float(cost[1]) > 0 and cost[1] == cost[2], result.stdout
    sizes = [len(b.custom_ids) for b in server.batches_submitted]
    assert len(sizes) >= 5 and max(sizes) <= 7 and sum(sizes) == 30
    assert len(read_rows(out)) == 30 and answered_once(server)


def test_wait_false_ends_after_submitting_and_the_next_run_collects(server, tmp_path):
    data, _ = make_dataset(tmp_path, 10)
    server.batch_latency = 2.0
    out = tmp_path / "out.jsonl"
    first = run_capflow(*batch_args(server, data, out, "serving.wait=false"), cwd=tmp_path)
    assert "run the same command again" in first.stdout + first.stderr
    assert len(server.batches_submitted) == 1
    # Again while the batch runs: every row says so at once, nothing is submitted again.
    still = run_capflow(*batch_args(server, data, out, "serving.wait=false"), cwd=tmp_path,
                        timeout=30)
    assert still.returncode == 1 and "BatchSubmitted" in still.stdout
    assert len(server.batches_submitted) == 1
    time.sleep(2.2)
    second = run_capflow(*batch_args(server, data, out), cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert len(server.batches_submitted) == 1
    assert all(r["caption"] for r in read_rows(out)) and answered_once(server)


def test_batch_file_round_trips_100_rows_through_a_results_file(server, tmp_path):
    """serving=batch_file writes the lines; the test server's batch logic answers the file (as
    vllm run-batch would); the next run reads the answers back into rows."""
    import openai

    data, _ = make_dataset(tmp_path, 100)
    out = tmp_path / "out.jsonl"
    args = [f"input={data}", f"output={out}", "serving=batch_file", "model_name=m",
            "serving.flush_after=0.1", "progress=false"]
    first = run_capflow(*args, cwd=tmp_path)
    assert first.returncode == 1 and "BatchSubmitted" in first.stdout + first.stderr
    requests = tmp_path / "batch_requests.jsonl"
    assert len(requests.read_text().splitlines()) == 100
    again = run_capflow(*args, cwd=tmp_path)  # no results yet: nothing written twice
    assert again.returncode == 1 and len(requests.read_text().splitlines()) == 100

    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    upload = client.files.create(file=requests.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 30
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.output_file_id
    results = tmp_path / "results.jsonl"
    results.write_bytes(client.files.content(batch.output_file_id).read())

    done = run_capflow(*args, f"serving.results_file={results}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 100
    assert all(r["caption"] == expected_caption(tmp_path / r["image"][0]) for r in rows)
    assert server.requests == []


def test_capflow_batches_cancel_cancels_what_a_run_left_running(server, tmp_path):
    data, _ = make_dataset(tmp_path, 6)
    server.batch_latency = 30.0  # still running when capflow leaves
    out = tmp_path / "out.jsonl"
    first = run_capflow(*batch_args(server, data, out, "serving.wait=false"), cwd=tmp_path)
    assert "still running" in first.stdout
    (batch,) = server.batches_submitted
    result = run_capflow("batches", "cancel", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"cancelled 1 batch(es): {batch.id}" in result.stdout
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    deadline = time.monotonic() + 10
    while client.batches.retrieve(batch.id).status != "cancelled" and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.batches.retrieve(batch.id).status == "cancelled"
    again = run_capflow("batches", "cancel", str(out), cwd=tmp_path)
    assert "cancelled 0 batch(es)" in again.stdout
