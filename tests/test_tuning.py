"""auto's sparse-or-dense threshold measured on this machine (flexmask.tuning): stored per
machine under XDG_CACHE_HOME, used by dispatch, explained, and off under FLEXMASK_TUNING=off."""

import json

import pytest
import torch

import flexmask as fm
from flexmask import cli, tuning


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """Measuring on, into a fresh cache directory, at sizes that take a second."""
    monkeypatch.setenv(tuning.TUNING_ENV, "on")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tuning, "TOKENS", 512)
    monkeypatch.setattr(tuning, "HEADS", 2)
    monkeypatch.setattr(tuning, "WINDOWS", (16, 200, 512))
    return tmp_path


def _case(cost, sparse, dense):
    return {"cost": cost, "sparse_ms": sparse, "dense_ms": dense}


def test_threshold_is_where_the_sparse_path_stops_winning():
    assert tuning.threshold([_case(0.2, 1, 2), _case(0.6, 3, 2), _case(0.4, 1, 2)]) == 0.5
    assert tuning.threshold([_case(0.2, 1, 2), _case(0.9, 1, 2)]) == 1.0
    assert tuning.threshold([_case(0.2, 3, 2), _case(0.9, 1, 2)]) == 0.0


def test_calibration_is_stored_per_machine_and_read_back(measuring):
    measured = tuning.calibrate([torch.float32])
    file = tuning.path()
    assert file.parent == measuring / "flexmask"
    data = json.loads(file.read_text())
    assert data["machine"] == tuning.machine()
    for mode in ("inference", "training"):
        entry = data["dtypes"]["float32"][mode]
        assert entry == measured["float32"][mode]
        assert [c["window"] for c in entry["cases"]] == [16, 200, 512]
        assert entry["max_density"] == tuning.threshold(entry["cases"])
    value, source = tuning.measured_max_density(torch.float32, True, 0.85)
    assert value == data["dtypes"]["float32"]["training"]["max_density"]
    assert "measured on this machine" in source


def test_another_machines_measurements_are_ignored(measuring):
    file = tuning.path()
    file.parent.mkdir(parents=True)
    other = {**tuning.machine(), "cpu": "some other CPU"}
    file.write_text(json.dumps({"machine": other, "dtypes": {"float32": {}}}))
    assert tuning.stored() == {}


@pytest.mark.parametrize(("measured", "backend"), [(0.0, "sdpa"), (1.0, "sparse")])
def test_auto_follows_the_measured_threshold_and_says_so(monkeypatch, measured, backend):
    monkeypatch.setenv(tuning.TUNING_ENV, "on")
    entry = {"max_density": measured, "cases": []}
    monkeypatch.setattr(tuning, "stored",
                        lambda: {"float32": {"inference": entry, "training": entry}})  # fmt: skip
    attn = fm.MultiheadFlexAttention(32, 4)
    x = torch.randn(1, 512, 32)
    assert attn.backend_for(x, mask=fm.sliding_window(64)) == backend
    why = attn.backend_for(x, mask=fm.sliding_window(64), explain=True)
    assert why.startswith(f"{backend}, by cpu_sparse_or_dense")
    assert f"threshold {measured:.2f} (measured on this machine" in why
    given = fm.MultiheadFlexAttention(32, 4, sparse_max_density=0.5)  # the caller's wins
    assert "threshold 0.50 (given (sparse_max_density))" in given.backend_for(
        x, mask=fm.sliding_window(64), explain=True
    )


def test_off_means_the_cost_model(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.TUNING_ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.measured_max_density(torch.float32, False, 0.85) == (
        0.85, "the cost model (FLEXMASK_TUNING=off)")  # fmt: skip
    attn = fm.MultiheadFlexAttention(32, 4)
    why = attn.backend_for(torch.randn(1, 512, 32), mask=fm.sliding_window(64), explain=True)
    assert "threshold 0.85 (the cost model (FLEXMASK_TUNING=off))" in why
    assert not (tmp_path / "flexmask").exists()  # nothing measured, nothing written
    assert cli.main(["tune"]) == 2  # refuses to measure, says why


def test_the_tune_command_measures_and_shows(measuring, capsys):
    assert cli.main(["tune", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "float32 training: sparse path up to cost" in out
    assert cli.main(["tune", "--show"]) == 0
    assert str(tuning.path()) in capsys.readouterr().out
