"""The calibration options of ``wanquant quantize`` and ``api.quantize``: cond-only, the
schedule and the statistics memory reach the run; bad values are refused before any model
is loaded, in one line naming the flag and the API argument."""

from __future__ import annotations

import pytest
from conftest import TINY_SETTINGS

import wanquant.api as wq
from wanquant.cli import main


@pytest.fixture
def captured(monkeypatch):
    """The CalibrationRun that api.quantize hands to the job (nothing is loaded or run)."""
    got = {}

    def fake_job(pipe, samples, cfg, run, out_dir, **kwargs):
        got["run"] = run
        return out_dir

    monkeypatch.setattr(wq, "quantize_pipeline", fake_job)
    monkeypatch.setattr(wq, "load_base_pipeline", lambda *a, **k: object())
    monkeypatch.setattr(wq, "pipeline_defaults", lambda pipe: TINY_SETTINGS)
    return got


def test_cli_passes_the_calibration_options_to_the_run(captured, tmp_path, capsys):
    assert main(["quantize", "--out", str(tmp_path / "q"), "--num-samples", "1", "--cond-only",
                 "--calib-schedule", "interleaved", "--stats-memory-gb", "12.5"]) == 0
    run = captured["run"]
    assert (run.cond_only, run.schedule, run.stats_memory_gb) == (True, "interleaved", 12.5)
    assert main(["quantize", "--out", str(tmp_path / "q2"), "--num-samples", "1"]) == 0
    run = captured["run"]
    assert (run.cond_only, run.schedule, run.stats_memory_gb) == (False, "expert_major", None)


@pytest.mark.parametrize("argv,message", [
    (["--stats-memory-gb", "-1"], r"--stats-memory-gb \(stats_memory_gb\) must be a number of GB >= 0"),
    (["--stats-memory-gb", "nan"], r"--stats-memory-gb .* got nan"),
])
def test_cli_refuses_bad_values_before_loading(captured, tmp_path, capsys, argv, message):
    import re

    capsys.readouterr()
    assert main(["quantize", "--out", str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert "run" not in captured and not list(tmp_path.iterdir())


def test_cli_schedule_choices(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--out", str(tmp_path / "q"), "--calib-schedule", "sideways"])
    assert e.value.code == 2 and "expert_major" in capsys.readouterr().err


def test_api_validates_the_options(captured, tmp_path):
    samples = wq.load_calibration("testbed", 1)
    for kwargs, message in (({"schedule": "sideways"}, r"schedule\) must be one of expert_major, interleaved"),
                            ({"stats_memory_gb": -2.0}, "stats_memory_gb"), ({"cond_only": "yes"}, "cond_only")):
        with pytest.raises(wq.InputError, match=message):
            wq.quantize(object(), samples, tmp_path / "q", "paper", TINY_SETTINGS, **kwargs)
    assert "run" not in captured
    wq.quantize(object(), samples, tmp_path / "q", "paper", TINY_SETTINGS, cond_only=True, stats_memory_gb=0)
    assert captured["run"].cond_only and captured["run"].stats_memory_gb == 0
