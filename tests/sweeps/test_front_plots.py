"""The front drawn for a reader: each trial's path in step order, the front labelled, base and champion
marked (PNG and interactive HTML); the parent run's Markdown note links each front trial's run."""

from sweeps.front_plots import front_figure, plot_front, trial_paths
from sweeps.selection import pareto_front
from sweeps.tracking import sweep_note

BASE = {"fid": 80.0, "heldout_quality": 0.95}


def rows():
    # trial a improves then drifts (its step 100 is best); trial b only gets worse
    a = [{"trial": "a", "step": s, "fid": f, "heldout_quality": q, "checkpoint": f"/x/a/step_{s}", "param:train.steps": 300}
         for s, f, q in ((300, 95.0, 0.97), (100, 82.0, 0.99), (200, 88.0, 0.985))]
    b = [{"trial": "b", "step": s, "fid": f, "heldout_quality": q, "checkpoint": f"/x/b/step_{s}", "param:train.steps": 200}
         for s, f, q in ((100, 81.0, 0.96), (200, 90.0, 0.955))]
    return a + b


def test_each_trial_is_a_path_in_step_order():
    paths = trial_paths(rows())
    assert [r["step"] for r in paths["a"]] == [100, 200, 300] and [r["step"] for r in paths["b"]] == [100, 200]


def test_the_figure_draws_paths_front_base_and_champion(tmp_path):
    table = rows()
    front = pareto_front(table)
    champion = next(r for r in table if r["trial"] == "a" and r["step"] == 100)
    fig = front_figure(table, front, BASE, champion)
    names = [trace.name for trace in fig.data]
    assert names == ["trial a", "trial b", "Pareto front", "base model", "champion (a @100)"]
    assert list(fig.data[0].x) == [82.0, 88.0, 95.0]  # step order, not file order
    assert list(fig.data[2].text) == ["b @100", "a @100"]
    assert "train.steps = 300" in fig.data[0].text[0]
    fig.write_html(tmp_path / "front.html", include_plotlyjs=True)
    html = (tmp_path / "front.html").read_text()
    assert "<script src=" not in html and len(html) > 1_000_000  # plotly.js inside, nothing fetched: opens offline
    plot_front(table, front, BASE, champion, tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 10_000


def test_intervals_as_bars_and_the_confirmed_candidates_marked(tmp_path):
    table = rows()
    front = pareto_front(table)  # b @100 (FID 81), a @100 (FID 82)
    front[1]["intervals"] = {"fid": {"value": 82.0, "low": 70.0, "high": 99.0}, "heldout_quality": {"value": 0.99, "low": 0.985, "high": 0.992}}
    confirmation = {"candidates": [{"checkpoint": "/x/a/step_100", "passed": True}, {"checkpoint": "/x/b/step_100", "passed": False}]}
    fig = front_figure(table, front, BASE, None, confirmation)
    traces = {trace.name: trace for trace in fig.data}
    bars = traces["95% intervals (screening)"]
    assert list(bars.x) == [82.0] and list(bars.error_x.arrayminus) == [12.0] and list(bars.error_x.array) == [17.0]
    assert list(bars.error_y.arrayminus) == [0.99 - 0.985] and list(traces["confirmed: passed"].x) == [82.0]
    front[1]["intervals"]["fid"]["low"] = 84.0  # a percentile interval above its point (FID's bootstrap bias): no negative bar
    assert list(front_figure(table, front, BASE, None, confirmation).data[3].error_x.arrayminus) == [0.0]
    assert list(traces["confirmed: failed"].x) == [81.0]
    plot_front(table, front, BASE, None, tmp_path / "front.png", confirmation)
    assert (tmp_path / "front.png").stat().st_size > 10_000


def test_the_note_summarises_and_links_trials():
    table = rows()
    front = pareto_front(table)
    champion = next(r for r in table if r["trial"] == "a" and r["step"] == 100)
    selection = {"base": BASE, "champion": champion, "front": front, "evaluated": len(table), "hypervolume": 0.01,
                 "rule": "highest held-out quality with FID <= 88", "registered": {"model": "m", "version": "3"}}
    note = sweep_note("s", "7", selection, {"a": "run-a", "b": "run-b"})
    assert note.startswith("**Champion: trial [a](#/experiments/7/runs/run-a), step 100: FID 82.000 (base 80.000)")
    assert "| base model | 80.000 | 0.9500 |" in note
    assert "[a](#/experiments/7/runs/run-a), step 100" in note
    assert "| [b](#/experiments/7/runs/run-b) | 100 | 81.000 | 0.9600 | train.steps=200 |" in note
    assert "| [a](#/experiments/7/runs/run-a) (champion) | 100 |" in note
    assert "[m version 3](#/models/m/versions/3)" in note
