"""The plugin's parts on their own: percentiles, the text format, the settings."""

from __future__ import annotations

import random
import statistics

import pytest
from capflow_metrics.quantiles import LatencySample
from capflow_metrics.settings import MetricsSettings, SettingsError
from capflow_metrics.textfile import Metric, format_metrics, write_atomically
from promtext import parse, value


def test_percentiles_are_exact_up_to_the_capacity():
    values = [random.Random(7).expovariate(5) for _ in range(1001)]
    sample = LatencySample(capacity=2000)
    for v in values:
        sample.add(v)
    expected = statistics.quantiles(values, n=100, method="inclusive")
    assert sample.exact
    assert sample.quantile(0.5) == pytest.approx(statistics.median(values))
    assert sample.quantile(0.9) == pytest.approx(expected[89])
    assert sample.quantile(0.99) == pytest.approx(expected[98])
    assert (sample.count, sample.max) == (1001, max(values))


def test_percentiles_beyond_the_capacity_come_from_a_bounded_sample():
    sample = LatencySample(capacity=500)
    for i in range(20_000):
        sample.add(i / 20_000)  # uniform over [0, 1)
    assert not sample.exact and len(sample._values) == 500
    assert sample.count == 20_000 and sample.sum == pytest.approx(sum(range(20_000)) / 20_000)
    assert sample.quantile(0.5) == pytest.approx(0.5, abs=0.08)
    assert sample.quantile(0.9) == pytest.approx(0.9, abs=0.05)


def test_textfile_escapes_and_parses(tmp_path):
    metric = Metric("capflow_x_total", "counter", 'Help with a \\ and\na newline.')
    metric.add(3, {"output": 'a "quoted"\\path\n'})
    text = format_metrics([metric, Metric("capflow_empty", "gauge", "No samples: left out.")])
    assert "capflow_empty" not in text
    path = tmp_path / "x.prom"
    write_atomically(path, text)
    write_atomically(path, text)  # replaces the old file
    assert [p.name for p in tmp_path.iterdir()] == ["x.prom"]  # no temporary file left
    assert value(parse(path.read_text()), "capflow_x_total", output='a "quoted"\\path\n') == 3


def test_settings_from_the_config():
    assert MetricsSettings.from_config({}) is None
    assert MetricsSettings.from_config({"model_name": "m"}) is None
    settings = MetricsSettings.from_config(
        {"metrics": {"dir": "m", "rows": False, "labels": {"job": "nightly"}}})
    assert settings is not None
    assert (str(settings.dir), settings.rows, settings.textfile) == ("m", False, True)
    assert settings.labels == {"job": "nightly"}
    for bad in ({"dir": ""}, {"dir": "m", "flush_seconds": -1}, {"dir": "m", "rows": "yes"},
                {"dir": "m", "labels": {"bad-name": "x"}}, {"dir": "m", "labels": {"status": 1}}):
        with pytest.raises(SettingsError):
            MetricsSettings.from_config({"metrics": bad})
