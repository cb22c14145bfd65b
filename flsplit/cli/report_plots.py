"""The PNG plots of ``flsplit report``: accuracy against rounds, simulated time and bytes,
and the cuts chosen per round. They need matplotlib (the ``reports`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from flsplit.extras import require
from flsplit.cli.report_runs import Summary

__all__ = ["CUTS_PLOT", "PLOT_FILES", "plot_accuracy", "plot_cuts", "write_plots"]

PLOT_FILES = {
    "round": "accuracy_vs_round.png",
    "sim": "accuracy_vs_sim_time.png",
    "bytes": "accuracy_vs_bytes.png",
}
CUTS_PLOT = "cuts_vs_round.png"
PLOTS_FEATURE = "flsplit report's plots"


def _matplotlib():
    """``Figure``, ``FigureCanvasAgg`` and ``MaxNLocator``, or the ``reports`` extra's MissingExtra."""
    figure = require("matplotlib.figure", "reports", PLOTS_FEATURE)
    agg = require("matplotlib.backends.backend_agg", "reports", PLOTS_FEATURE)
    ticker = require("matplotlib.ticker", "reports", PLOTS_FEATURE)
    return figure.Figure, agg.FigureCanvasAgg, ticker.MaxNLocator


def _axes(title: str, xlabel: str, metric: str, target: float):
    """A new figure (no pyplot, Agg canvas) with one labelled axes."""
    Figure, FigureCanvasAgg, _ = _matplotlib()
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    name = metric.replace("_", " ")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_accuracy(path: Path, summaries: Sequence[Summary], x: str, *, metric: str,
                  target: float) -> bool:
    """Plot accuracy against ``x`` (``"round"``, ``"sim"`` or ``"bytes"``) for every run
    that has both; return False (nothing written) if no run has.

    Parameters
    ----------
    path : Path
        PNG file to write.
    summaries : sequence of Summary
    x : str
        ``"round"``: round number; ``"sim"``: cumulative simulated seconds; ``"bytes"``:
        cumulative MB up + down.
    metric, target : str, float
        Accuracy field (for the axis label) and the target line.
    """
    xs_of = {"round": lambda s: s.round_numbers, "sim": lambda s: s.cum_sim_s, "bytes": lambda s: s.cum_mb}[x]
    xlabel, title = {
        "round": ("round", "accuracy vs round"),
        "sim": ("cumulative simulated time (s)", "accuracy vs simulated time"),
        "bytes": ("cumulative traffic, up + down (MB)", "accuracy vs traffic"),
    }[x]
    series = []
    for s in summaries:
        xs = xs_of(s)
        if xs is None:
            continue
        points = [(xv, a) for xv, a in zip(xs, s.accuracy) if a is not None]
        if points:
            series.append((s.label, points))
    if not series:
        return False
    fig, ax = _axes(f"{metric.split('_')[0].capitalize()} {title}", xlabel, metric, target)
    for label, points in series:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    if x == "round":
        ax.xaxis.set_major_locator(_matplotlib()[2](integer=True))
    ax.set_ylim(bottom=0.0, top=max(1.0, target) + 0.02)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_cuts(path: Path, summaries: Sequence[Summary], *, metric: str, target: float) -> bool:
    """Accuracy per round beside the cuts the clients trained with per round (every client a
    dot, the mean a line), for every run with cuts; False (nothing written) if none has."""
    runs = [s for s in summaries if any(s.cuts)]
    if not runs:
        return False
    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib()
    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    acc_ax, cut_ax = fig.subplots(1, 2)
    acc_ax.set_title(f"{metric.split('_')[0].capitalize()} accuracy vs round")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel(metric.replace("_", " "))
    acc_ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    cut_ax.set_title("cuts chosen per round (dots: clients, line: mean)")
    cut_ax.set_xlabel("round")
    cut_ax.set_ylabel("cut layer")
    for i, s in enumerate(runs):
        color = f"C{i}"
        label = s.label + (f" ({s.planner})" if s.planner and s.planner not in s.label else "")
        points = [(n, a) for n, a in zip(s.round_numbers, s.accuracy) if a is not None]
        if points:
            acc_ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, color=color, label=label)
        offset = (i - (len(runs) - 1) / 2) * 0.08  # runs side by side at each round
        xs = [n + offset for n, cuts in zip(s.round_numbers, s.cuts) for _ in cuts]
        ys = [c for cuts in s.cuts for c in cuts]
        cut_ax.scatter(xs, ys, s=12, alpha=0.5, color=color)
        means = [(n, sum(c) / len(c)) for n, c in zip(s.round_numbers, s.cuts) if c]
        cut_ax.plot([m[0] for m in means], [m[1] for m in means], color=color, label=label)
    for ax in (acc_ax, cut_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    cut_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.set_ylim(bottom=0.0, top=max(1.0, target) + 0.02)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_plots(out: Path, summaries: Sequence[Summary], *, metric: str, target: float) -> list[Path]:
    """Write the PNGs that have data; return their paths."""
    written = []
    for x, name in PLOT_FILES.items():
        path = out / name
        if plot_accuracy(path, summaries, x, metric=metric, target=target):
            written.append(path)
    if plot_cuts(out / CUTS_PLOT, summaries, metric=metric, target=target):
        written.append(out / CUTS_PLOT)
    return written
