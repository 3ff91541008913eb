"""The sweep's front, drawn: a PNG (matplotlib, for files and reports) and an interactive HTML page
(plotly), from the selection's table of evaluated checkpoints.

Both show the same story, on the sweep's fidelity axis (`axis`: fid or kid): every evaluated
checkpoint, each trial's path through its checkpoints in step order (a trial can pass the champion on
its way to a worse end), the Pareto front, the base model and the champion, each front point
labelled with its trial and step, with its screening
figures' 95% intervals as bars (when the selection computed them), and the candidates the
confirmation re-measured marked passed or failed at their screening place (their confirmation
figures come from another sample count, where FID's bias differs: the table in selection.json and the
parent run's note has them). The HTML adds what a mouse can ask for: any point's trial, step, figures
and parameters.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sweeps.selection import params_text


def trial_paths(rows: list[dict]) -> dict[str, list[dict]]:
    """Each trial's evaluated checkpoints, in step order."""
    paths = defaultdict(list)
    for row in rows:
        paths[row["trial"]].append(row)
    return {trial: sorted(points, key=lambda r: r.get("step", 0)) for trial, points in sorted(paths.items())}


def label(row: dict) -> str:
    return f"{row['trial']} @{row.get('step', '?')}"


def error_bars(front: list[dict], axis: str = "fid") -> tuple[list[dict], list[list[float]], list[list[float]]]:
    """The front's points that carry screening intervals, and their (minus, plus) extents on both axes.
    A percentile interval need not contain its point figure (FID's bootstrap is biased upward: the
    resamples repeat samples), so an extent past the point is drawn as 0."""
    points = [r for r in front if "intervals" in r]

    def extent(name):
        return ([max(0.0, r[name] - r["intervals"][name]["low"]) for r in points],
                [max(0.0, r["intervals"][name]["high"] - r[name]) for r in points])
    return points, extent(axis), extent("heldout_quality")


def confirmed_points(front: list[dict], confirmation: dict | None) -> dict[bool, list[dict]]:
    """The front's rows the confirmation re-measured, by whether they passed."""
    outcome = {c["checkpoint"]: c["passed"] for c in (confirmation or {}).get("candidates", [])}
    return {passed: [r for r in front if outcome.get(r["checkpoint"]) is passed] for passed in (True, False)}


def plot_front(rows: list[dict], front: list[dict], base: dict, champion: dict | None, path: Path, confirmation: dict | None = None,
               axis: str = "fid") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for number, (trial, points) in enumerate(trial_paths(rows).items()):
        ax.plot([r[axis] for r in points], [r["heldout_quality"] for r in points], "-o", lw=0.8, ms=3, alpha=0.45,
                color=plt.cm.tab20(number % 20), label="trials, step by step" if number == 0 else None)
        ax.annotate(f"{trial} @{points[-1].get('step', '?')}", (points[-1][axis], points[-1]["heldout_quality"]), fontsize=6,
                    color="0.45", xytext=(3, -6), textcoords="offset points")
    ax.plot([r[axis] for r in front], [r["heldout_quality"] for r in front], "o-", c="tab:red", ms=6, lw=1.5, label="Pareto front")
    points, xerr, yerr = error_bars(front, axis)
    if points:
        ax.errorbar([r[axis] for r in points], [r["heldout_quality"] for r in points], xerr=xerr, yerr=yerr, fmt="none",
                    ecolor="tab:red", alpha=0.35, lw=1, capsize=2, label="95% intervals (screening)")
    for passed, marked in confirmed_points(front, confirmation).items():
        if marked:
            ax.scatter([r[axis] for r in marked], [r["heldout_quality"] for r in marked], marker="s" if passed else "x", s=90,
                       c="tab:green" if passed else "0.3", zorder=6, label="confirmed: passed" if passed else "confirmed: failed")
    for row in front:
        ax.annotate(label(row), (row[axis], row["heldout_quality"]), fontsize=7, color="tab:red", xytext=(4, 4), textcoords="offset points")
    ax.scatter([base[axis]], [base["heldout_quality"]], marker="*", s=200, c="black", zorder=5, label="base model")
    if champion:
        ax.scatter([champion[axis]], [champion["heldout_quality"]], s=260, facecolors="none", edgecolors="tab:blue", linewidths=2.5,
                   zorder=6, label=f"champion ({label(champion)})")
    ax.set_title("Evaluated checkpoints: each trial's path, the front, the champion", fontsize=10)
    save_front_plot(fig, ax, path, axis)


def save_front_plot(fig, ax, path: Path, axis: str = "fid") -> None:
    """The axes every fidelity / held-out quality plot shares (a sweep's front, a study's fronts), then the file."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(f"{axis.upper()} (lower is better)")
    ax.set_ylabel("held-out quality (higher is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def front_figure(rows: list[dict], front: list[dict], base: dict, champion: dict | None, confirmation: dict | None = None,
                 axis: str = "fid"):
    """The same plot as a plotly figure: hover a point for its trial, step, figures and parameters."""
    import plotly.graph_objects as go

    def hover(row: dict) -> str:
        params = params_text(row, "<br>", " = ")
        return f"trial {row['trial']}, step {row.get('step', '?')}<br>{axis.upper()} {row[axis]:.3f}, held-out {row['heldout_quality']:.4f}<br>{params}"

    fig = go.Figure()
    for trial, points in trial_paths(rows).items():
        fig.add_trace(go.Scatter(x=[r[axis] for r in points], y=[r["heldout_quality"] for r in points], mode="lines+markers",
                                 name=f"trial {trial}", legendgroup="trials", opacity=0.6, text=[hover(r) for r in points],
                                 hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[r[axis] for r in front], y=[r["heldout_quality"] for r in front], mode="lines+markers+text",
                             name="Pareto front", line={"color": "crimson", "width": 3}, marker={"size": 10},
                             text=[label(r) for r in front], textposition="top right", hovertext=[hover(r) for r in front],
                             hoverinfo="text"))
    points, xerr, yerr = error_bars(front, axis)
    if points:
        fig.add_trace(go.Scatter(x=[r[axis] for r in points], y=[r["heldout_quality"] for r in points], mode="markers",
                                 name="95% intervals (screening)", marker={"size": 1, "color": "crimson"}, hoverinfo="skip",
                                 error_x={"type": "data", "symmetric": False, "array": xerr[1], "arrayminus": xerr[0], "thickness": 1},
                                 error_y={"type": "data", "symmetric": False, "array": yerr[1], "arrayminus": yerr[0], "thickness": 1}))
    for passed, marked in confirmed_points(front, confirmation).items():
        if marked:
            fig.add_trace(go.Scatter(x=[r[axis] for r in marked], y=[r["heldout_quality"] for r in marked], mode="markers",
                                     name="confirmed: passed" if passed else "confirmed: failed",
                                     marker={"symbol": "square-open" if passed else "x", "size": 16, "color": "green" if passed else "gray"},
                                     hovertext=[hover(r) for r in marked], hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[base[axis]], y=[base["heldout_quality"]], mode="markers", name="base model",
                             marker={"symbol": "star", "size": 18, "color": "black"},
                             hovertext=[f"base model<br>{axis.upper()} {base[axis]:.3f}, held-out {base['heldout_quality']:.4f}"], hoverinfo="text"))
    if champion:
        fig.add_trace(go.Scatter(x=[champion[axis]], y=[champion["heldout_quality"]], mode="markers", name=f"champion ({label(champion)})",
                                 marker={"symbol": "circle-open", "size": 24, "color": "royalblue", "line": {"width": 3}},
                                 hovertext=["champion<br>" + hover(champion)], hoverinfo="text"))
    fig.update_layout(title="Evaluated checkpoints: each trial's path, the front, the champion",
                      xaxis_title=f"{axis.upper()} (lower is better)", yaxis_title="held-out quality (higher is better)", template="plotly_white")
    return fig
