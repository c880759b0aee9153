"""benchmarks/head_weight_decay.py's resume logic, on a fake run function
(no training): finished runs are appended as they finish, skipped on rerun,
and a kill mid-sweep loses only the run in progress."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def hwd(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its `import results`
    spec = importlib.util.spec_from_file_location("head_weight_decay",
                                                  BENCHMARKS / "head_weight_decay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_appends_each_run_and_a_rerun_continues_where_it_stopped(hwd, tmp_path):
    runs = hwd.grid_runs((0.0, 3.0), (0.0, 0.03), seeds=(0, 1), steps=10)
    assert len(runs) == 8 and len({hwd.run_key(r) for r in runs}) == 8
    path = tmp_path / "work" / "results.jsonl"
    calls = []

    def fake(run):
        calls.append(hwd.run_key(run))
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed during the 4th run
        return {"upstream": run["head_wd"] / 10, "fewshot10": run["body_wd"] + run["seed"]}

    with pytest.raises(KeyboardInterrupt):
        hwd.sweep(runs, fake, path, log=lambda m: None)
    assert len(path.read_text().splitlines()) == 3  # the finished ones, on disk
    with open(path, "a") as f:
        f.write('{"mode": "grid", "head_')  # a line cut by the kill is ignored

    calls.clear()
    rows = hwd.sweep(runs, lambda run: (calls.append(hwd.run_key(run)) or
                                        {"upstream": 0.5, "fewshot10": 0.5}), path,
                     log=lambda m: None)
    assert calls == [hwd.run_key(r) for r in runs[3:]]  # only the unfinished ones
    assert sorted(hwd.run_key(r) for r in rows) == sorted(hwd.run_key(r) for r in runs)
    calls.clear()
    again = hwd.sweep(runs, lambda run: calls.append(run) or {}, path, log=lambda m: None)
    assert calls == [] and len(again) == 8  # all done: nothing reruns
    assert all("seconds" in r for r in rows)


def test_cell_stats_and_reading_state_the_spread(hwd):
    rows = [dict(head_wd=h, body_wd=0.03, seed=s, upstream=up, fewshot10=down)
            for h, s, up, down in [(0.0, 0, 0.99, 0.60), (0.0, 1, 0.97, 0.62),
                                   (3.0, 0, 0.90, 0.80), (3.0, 1, 0.92, 0.78)]]
    up = hwd.cell_stats(rows, "upstream", ("head_wd", "body_wd"))
    down = hwd.cell_stats(rows, "fewshot10", ("head_wd", "body_wd"))
    mean, spread, n = down[(3.0, 0.03)]
    assert (round(mean, 4), n) == (0.79, 2) and spread == pytest.approx(0.01414, rel=1e-3)
    text = hwd.reading(up, down, (0.0, 3.0), (0.03,))
    assert "downstream +18.0" in text and "upstream -7.0" in text
    assert "does raise few-shot transfer and lower upstream accuracy" in text
    flat = hwd.reading(up, up, (0.0, 3.0), (0.03,))  # downstream falls: not reproduced
    assert "not" in flat or "only partly" in flat
    assert json.dumps(hwd.grid_runs((0.0,), (0.0,), (0,), 5)[0])  # runs are JSON rows
