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
    # compiled flex is timed by a slow test; here a stand-in half as fast as dense SDPA
    monkeypatch.setattr(tuning, "_flex_ms", lambda q, k, v, bm: (1e9, None))
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
    flex = data["dtypes"]["float32"]["inference"]["flex"]  # never faster: never picked
    assert flex["max_density"] == 0.0 and flex["vs_sparse"] > 1 and flex["error"] is None
    assert tuning.measured_flex(torch.float32) is None
    assert "flex" not in data["dtypes"]["float32"]["training"]


def _flex_case(cost, sparse, dense, flex):
    return {**_case(cost, sparse, dense), "flex_ms": flex}


def test_flex_summary_is_its_median_ratio_and_its_threshold():
    cases = [_flex_case(0.1, 10, 50, 4), _flex_case(0.5, 30, 50, 20), _flex_case(0.9, 45, 50, 60)]
    summary = tuning._flex_summary(cases, None)
    assert summary == {"vs_sparse": 2 / 3, "max_density": 0.7, "error": None}
    failed = tuning._flex_summary(cases[:1], "CalledProcessError: no C++ compiler")
    assert failed["vs_sparse"] is None and failed["max_density"] == 0.0
    assert failed["error"].startswith("CalledProcessError")


def _stored_flex(monkeypatch, ratio, max_density=1.0, error=None):
    monkeypatch.setenv(tuning.TUNING_ENV, "on")
    flex = {"vs_sparse": ratio, "max_density": max_density, "error": error}
    inference = {"max_density": 1.0, "cases": [], "flex": flex}
    training = {"max_density": 1.0, "cases": []}
    measured = {"float32": {"inference": inference, "training": training}}
    monkeypatch.setattr(tuning, "stored", lambda: measured)


def test_auto_runs_flex_on_cpu_only_where_it_measured_clearly_faster(monkeypatch):
    attn = fm.MultiheadFlexAttention(32, 4)
    x, mask = torch.randn(1, 512, 32), fm.sliding_window(64)  # cost 0.44
    _stored_flex(monkeypatch, ratio=0.5)
    with torch.no_grad():
        assert attn.backend_for(x, mask=mask) == "flex"
        why = attn.backend_for(x, mask=mask, explain=True)
    assert why.startswith("flex, by cpu_flex_where_measured_faster")
    assert "flex measured at 0.50x the sparse path's time" in why
    assert attn.backend_for(x, mask=mask) == "sparse"  # training: flex has no CPU backward
    with torch.no_grad():
        given = fm.MultiheadFlexAttention(32, 4, sparse_max_density=0.9)
        assert given.backend_for(x, mask=mask) == "sparse"  # the caller's threshold rules
        _stored_flex(monkeypatch, ratio=0.5, max_density=0.3)  # costlier than flex beat dense
        assert attn.backend_for(x, mask=mask) == "sparse"
        _stored_flex(monkeypatch, ratio=0.95)  # within the margin: not worth a compile
        assert attn.backend_for(x, mask=mask) == "sparse"
        _stored_flex(monkeypatch, ratio=None, max_density=0.0, error="InductorError: ...")
        assert attn.backend_for(x, mask=mask) == "sparse"


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
    out = capsys.readouterr().out
    assert str(tuning.path()) in out
    assert "float32 inference: flex at" in out and ": not picked (cost: times)" in out


@pytest.mark.slow
def test_calibration_times_compiled_flex(measuring, monkeypatch):
    """The real thing: compiled flex timed on the ladder (seconds of compiling)."""
    monkeypatch.undo()  # the real _flex_ms, small sizes again
    monkeypatch.setenv(tuning.TUNING_ENV, "on")
    monkeypatch.setenv("XDG_CACHE_HOME", str(measuring))
    monkeypatch.setattr(tuning, "TOKENS", 512)
    monkeypatch.setattr(tuning, "HEADS", 2)
    monkeypatch.setattr(tuning, "WINDOWS", (16, 512))
    inference = tuning.calibrate([torch.float32])["float32"]["inference"]
    assert inference["flex"]["error"] is None
    assert all(c["flex_ms"] > 0 for c in inference["cases"])
    assert inference["flex"] == tuning._flex_summary(inference["cases"], None)


@pytest.mark.slow
def test_auto_running_flex_on_cpu_gives_the_sparse_paths_answer(monkeypatch):
    _stored_flex(monkeypatch, ratio=0.5)
    torch.manual_seed(0)
    attn = fm.MultiheadFlexAttention(32, 4).eval()
    x, mask = torch.randn(1, 512, 32), fm.sliding_window(64)
    with torch.no_grad():
        assert attn.backend_for(x, mask=mask) == "flex"
        got = attn(x, mask=mask)
        attn.backend = "sparse"
        want = attn(x, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
