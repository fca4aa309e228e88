"""Adaptive sending end to end: the real ``capflow`` command against a real loopback server
that rate-limits, queues behind a few slots, or fails. (Full-size figures: benchmarks/.)"""

from __future__ import annotations

import threading
import time

from conftest import expected_caption, make_dataset, read_rows, run_capflow

from capflow.testing.server import FakeOpenAIServer


def _args(server: FakeOpenAIServer, data, out, *more: str) -> list[str]:
    return [f"input={data}", f"output={out}", f"api_url={server.base_url}", "model_name=m",
            "progress=false", "cache.enabled=false", *more]


def _captioned(tmp_path, rows, out) -> None:
    written = read_rows(out)
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    for original, row in zip(rows, written, strict=True):
        assert row.get("caption") == expected_caption(tmp_path / original["image"][0]), row


def test_a_rate_limited_server_is_paced_without_any_rpm_setting(tmp_path):
    data, rows = make_dataset(tmp_path, 120)
    with FakeOpenAIServer(rpm_limit=2400) as server:  # 40 a second, per one-second window
        began = time.monotonic()
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "max_workers=32"),
                             cwd=tmp_path)
        elapsed = time.monotonic() - began
        sent = server.stats()["requests_total"]
    assert result.returncode == 0, result.stderr
    _captioned(tmp_path, rows, tmp_path / "o.jsonl")
    assert sent <= 2 * 120
    assert elapsed <= 1.5 * (120 / 40) + 2.5  # the first window is partial, plus start-up
    assert "429 answers, paced at" in result.stdout


def test_a_server_with_few_slots_gets_few_requests_at_once_and_none_time_out(tmp_path):
    data, rows = make_dataset(tmp_path, 200)
    with FakeOpenAIServer(slots=4, latency=0.05) as server:
        began = time.monotonic()
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "max_workers=64",
                                    "timeout=0.5"), cwd=tmp_path)
        elapsed = time.monotonic() - began
        stats = server.stats()
    assert result.returncode == 0, result.stderr
    _captioned(tmp_path, rows, tmp_path / "o.jsonl")
    assert stats["requests_total"] <= 1.25 * 200
    assert stats["max_in_flight"] < 64
    ideal = 200 / 4 * 0.05
    assert elapsed <= 2 * ideal + 2.0  # plus start-up
    assert "in flight adapted to the server" in result.stdout


def test_adaptive_false_keeps_max_workers_in_flight(tmp_path):
    data, _ = make_dataset(tmp_path, 60)
    with FakeOpenAIServer(slots=2, latency=0.02) as server:
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "max_workers=20",
                                    "adaptive=false"), cwd=tmp_path)
        assert server.stats()["max_in_flight"] == 20
    assert result.returncode == 0, result.stderr


def test_a_server_failing_every_request_stops_the_run_with_its_message(tmp_path):
    data, _ = make_dataset(tmp_path, 200)
    failure = (500, "image input is not supported - hint: you may need to provide the mmproj")
    with FakeOpenAIServer(failure=failure) as server:
        began = time.monotonic()
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "stop.outage_s=3"),
                             cwd=tmp_path)
        elapsed = time.monotonic() - began
        sent = server.stats()["requests_total"]
    assert result.returncode == 1
    assert sent <= 40
    assert elapsed < 20
    lines = [line for line in result.stderr.splitlines() if "stopped early" in line]
    assert len(lines) == 1 and "image input is not supported" in lines[0]
    assert "stop.outage_s=3" in lines[0]
    assert "Traceback" not in result.stderr
    assert "rows not finished are left for the next run" in result.stdout


def test_an_outage_in_the_middle_of_a_run_is_ridden_out(tmp_path):
    data, rows = make_dataset(tmp_path, 150)
    with FakeOpenAIServer(latency=0.02) as server:
        def outage() -> None:
            while server.stats()["responses_ok"] < 30:
                time.sleep(0.01)
            server.failure = (503, "upstream unavailable")
            time.sleep(1.5)
            server.failure = None

        thread = threading.Thread(target=outage)
        thread.start()
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "max_workers=8",
                                    "retry.max_attempts=3"), cwd=tmp_path)
        thread.join()
        statuses = server.stats()["statuses"]
    assert result.returncode == 0, result.stdout + result.stderr
    _captioned(tmp_path, rows, tmp_path / "o.jsonl")
    assert "paused 1 time for an outage" in result.stdout
    assert statuses.get("503", 0) <= 30  # probes, not every row's attempts


def test_a_certificate_that_does_not_verify_stops_the_run_at_once(tmp_path):
    import ssl

    import trustme

    from capflow.testing.hostile import HostileServer

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    data, _ = make_dataset(tmp_path, 30)
    with HostileServer(ssl=context) as server:
        began = time.monotonic()
        refused = run_capflow(*_args(server, data, tmp_path / "o.jsonl"), cwd=tmp_path)
        elapsed = time.monotonic() - began
        assert server.requests == 0 and server.connections <= 10  # no retry loop
        trusted = run_capflow(*_args(server, data, tmp_path / "o.jsonl",
                                     f"serving.ca_file={tmp_path / 'ca.pem'}"), cwd=tmp_path)
    assert refused.returncode == 1 and elapsed < 10
    [line] = [line for line in refused.stderr.splitlines() if "stopped early" in line]
    assert "TLSError" in line and "serving.ca_file" in line and "SSL_CERT_FILE" in line
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr


def test_a_redirect_stops_the_run_naming_the_api_url_to_set(tmp_path):
    from capflow.testing.hostile import HostileServer

    data, _ = make_dataset(tmp_path, 30)
    with HostileServer("redirect", status=301,
                       location="https://api.example.org/v1/chat/completions") as server:
        result = run_capflow(*_args(server, data, tmp_path / "o.jsonl"), cwd=tmp_path)
        assert server.requests <= 10
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if "stopped early" in line]
    assert "set api_url to https://api.example.org/v1" in line
