"""Summarize one run or compare several: a table and accuracy plots from history.json files.

``flsplit report RUN [RUN ...]`` where each RUN is a run directory holding ``history.json``
or the path of a ``history.json``. It prints one table row per run (Markdown, readable as
plain text) with:

- ``label``: ``--label`` (once per run, in order) or the scheme and the run directory's name;
- ``rounds``; ``final acc`` (the accuracy of the last round that has one) and ``best acc``
  (with its round), four decimals as in the run's log;
- ``rounds to T`` and ``sim s to T``: the first round whose accuracy reaches ``--target``
  (default 0.9), and the simulated seconds up to the end of that round (``-`` when the target
  is never reached);
- ``MB up`` / ``MB down``: total bytes of the run (1 MB = 10^6 bytes); ``wall s``: sum of the
  rounds' wall seconds;
- ``sim latency s`` / ``sim energy J``: sum of the rounds' simulated latency
  (``sim.round_latency_s``) and device energy (``sim.energy_j``, or ``sim.total_energy_j``),
  with at least 3 significant digits.

Simulated columns appear only when some run has a ``sim`` record in every round; a value
that a run lacks shows as ``n/a``. Writes into ``--out`` (default: the run's directory for a
single run, ``./flsplit-report`` for several):

- ``report.md``: the table, the notes and the plots;
- ``summary.csv``: the same rows as raw numbers (empty cell = not available);
- ``accuracy_vs_round.png``, ``accuracy_vs_sim_time.png`` (only if some run has simulated
  latency), ``accuracy_vs_bytes.png`` (cumulative bytes up + down); several runs share the
  axes, with a legend;
- ``cuts_vs_round.png``: accuracy per round beside the cuts the clients trained with (every
  client a dot, the mean a line; adaptive runs name their planner).

What is missing (no ``sim``, no accuracy, no byte counts) is skipped and listed under
"Notes". The plots need matplotlib (``pip install "flsplit[reports]"``); without it the
table, ``summary.csv`` and ``report.md`` are still written, and the notes say why there are no
plots. Exit status 0 on success, 1 when a RUN is missing, is not a flsplit history or has
no rounds (the message names the file), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from flsplit.extras import MissingExtra, require

__all__ = [
    "ReportError",
    "Run",
    "Summary",
    "add_arguments",
    "format_table",
    "handle",
    "load_run",
    "summarize",
]

DEFAULT_TARGET = 0.9
MULTI_RUN_OUT = "flsplit-report"
METRICS = ("test_accuracy", "eval_accuracy", "train_accuracy")
PLOT_FILES = {
    "round": "accuracy_vs_round.png",
    "sim": "accuracy_vs_sim_time.png",
    "bytes": "accuracy_vs_bytes.png",
}
CUTS_PLOT = "cuts_vs_round.png"


class ReportError(Exception):
    """A RUN argument that cannot be reported on (missing, not a history, no rounds)."""


# ---------------------------------------------------------------------------------------
# Loading


@dataclass
class Run:
    """One run's history, as loaded.

    Parameters
    ----------
    path : Path
        The ``history.json`` file.
    settings : dict
        The ``"run"`` record (run config).
    rounds : list of dict
        The round records, sorted by round number.
    label : str
        Name of the run in the table and legends.
    """

    path: Path
    settings: dict[str, Any]
    rounds: list[dict[str, Any]]
    label: str = ""


def history_path(arg: str | Path) -> Path:
    """The ``history.json`` a RUN argument names.

    Parameters
    ----------
    arg : str or Path
        A run directory or a history file.

    Returns
    -------
    Path
        The history file (it exists).

    Raises
    ------
    ReportError
        If the path does not exist or the directory holds no ``history.json``.
    """
    path = Path(arg).expanduser()
    if not path.exists():
        raise ReportError(f"{arg}: no such file or directory")
    if path.is_dir():
        candidate = path / "history.json"
        if not candidate.is_file():
            nested = sorted(path.glob("*/history.json"))
            hint = f" (its subdirectories hold {len(nested)}: pass those run directories)" if nested else ""
            raise ReportError(f"{arg}: directory has no history.json{hint}")
        return candidate
    return path


def _validate(data: Any, path: Path) -> list[dict[str, Any]]:
    """The round records of a parsed history, or a ReportError saying what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise ReportError(f"{path}: not a flsplit history (expected a JSON object with a 'rounds' list)")
    if "run" in data and not isinstance(data["run"], dict):
        raise ReportError(f"{path}: not a flsplit history ('run' is not an object)")
    rounds = data["rounds"]
    if not rounds:
        raise ReportError(f"{path}: history has no rounds (the run stopped before its first round ended?)")
    for i, entry in enumerate(rounds):
        if not isinstance(entry, dict) or _number(entry.get("round")) is None:
            raise ReportError(f"{path}: not a flsplit history (rounds[{i}] has no 'round' number)")
    return sorted(rounds, key=lambda r: r["round"])


def load_run(arg: str | Path) -> Run:
    """Load and check one RUN argument.

    Parameters
    ----------
    arg : str or Path
        A run directory or a ``history.json`` path.

    Returns
    -------
    Run
        With the default label (scheme and directory name).

    Raises
    ------
    ReportError
        Missing path, unreadable or non-JSON file, not a flsplit history, no rounds.
    """
    path = history_path(arg)
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a flsplit history (not a text file)") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not a flsplit history (invalid JSON: {err})") from None
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror or err})") from None
    rounds = _validate(data, path)
    run = Run(path=path, settings=data.get("run") or {}, rounds=rounds)
    run.label = default_label(run)
    return run


def default_label(run: Run) -> str:
    """``<scheme> <run directory name>``, e.g. ``PSL 20260101-120000-psl-1``."""
    scheme = run.rounds[-1].get("scheme") or run.settings.get("strategy") or "run"
    return f"{scheme} {run.path.resolve().parent.name}"


def _unique_labels(labels: Sequence[str]) -> list[str]:
    """Labels made distinct by appending ``#2``, ``#3``... to repeats."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


# ---------------------------------------------------------------------------------------
# Summaries


def _number(value: Any) -> Optional[float]:
    """``value`` as a finite float, or None (missing, null, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _sim_value(entry: dict[str, Any], *keys: str) -> Optional[float]:
    """The first of ``keys`` found as a number in the round's ``sim`` record."""
    sim = entry.get("sim")
    if not isinstance(sim, dict):
        return None
    for key in keys:
        value = _number(sim.get(key))
        if value is not None:
            return value
    return None


def _cumulative(values: Sequence[Optional[float]]) -> Optional[list[float]]:
    """Running sums, or None if any value is missing."""
    if any(v is None for v in values):
        return None
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


@dataclass
class Summary:
    """The numbers of one run shown in the table and the plots.

    ``None`` means not available; ``reached_round`` is None when the target is not reached.
    The series (``round_numbers``, ``accuracy``, ``cum_sim_s``, ``cum_mb``) have one item
    per round; ``accuracy`` items may be None, the cumulative series are None as a whole
    when a round lacks the value.
    """

    label: str
    path: Path
    rounds: int
    final_accuracy: Optional[float]
    best_accuracy: Optional[float]
    best_round: Optional[int]
    reached_round: Optional[int]
    sim_s_to_target: Optional[float]
    mb_up: Optional[float]
    mb_down: Optional[float]
    wall_s: Optional[float]
    sim_latency_s: Optional[float]
    sim_energy_j: Optional[float]
    round_numbers: list[int] = field(default_factory=list)
    accuracy: list[Optional[float]] = field(default_factory=list)
    cum_sim_s: Optional[list[float]] = None
    cum_mb: Optional[list[float]] = None
    cuts: list[list[int]] = field(default_factory=list)  # per round, the clients' cuts
    planner: Optional[str] = None  # the planner in the loop, if any


def _total(rounds: Sequence[dict[str, Any]], key: str) -> Optional[float]:
    values = [_number(r.get(key)) for r in rounds]
    return None if any(v is None for v in values) else float(sum(values))


def summarize(run: Run, target: float = DEFAULT_TARGET, metric: str = "test_accuracy") -> Summary:
    """Compute the table row and plot series of a run.

    Parameters
    ----------
    run : Run
        A loaded run.
    target : float
        Accuracy to reach for the time-to-target columns.
    metric : str
        Round field used as accuracy (``test_accuracy`` by default).

    Returns
    -------
    Summary
    """
    rounds = run.rounds
    accuracy = [_number(r.get(metric)) for r in rounds]
    numbers = [int(r["round"]) for r in rounds]
    known = [(a, n) for a, n in zip(accuracy, numbers) if a is not None]
    best = max(known, key=lambda an: an[0]) if known else (None, None)
    reached = next((i for i, a in enumerate(accuracy) if a is not None and a >= target), None)
    cum_sim = _cumulative([_sim_value(r, "round_latency_s") for r in rounds])
    energy = [_sim_value(r, "energy_j", "total_energy_j") for r in rounds]
    up, down = _total(rounds, "bytes_up"), _total(rounds, "bytes_down")
    traffic = [(_number(r.get("bytes_up")), _number(r.get("bytes_down"))) for r in rounds]
    cum_bytes = _cumulative([None if None in ud else (ud[0] + ud[1]) / 1e6 for ud in traffic])
    return Summary(
        label=run.label,
        path=run.path,
        rounds=len(rounds),
        final_accuracy=known[-1][0] if known else None,
        best_accuracy=best[0],
        best_round=best[1],
        reached_round=numbers[reached] if reached is not None else None,
        sim_s_to_target=cum_sim[reached] if cum_sim and reached is not None else None,
        mb_up=up / 1e6 if up is not None else None,
        mb_down=down / 1e6 if down is not None else None,
        wall_s=_total(rounds, "wall_seconds"),
        sim_latency_s=cum_sim[-1] if cum_sim else None,
        sim_energy_j=None if None in energy else float(sum(energy)),
        round_numbers=numbers,
        accuracy=accuracy,
        cum_sim_s=cum_sim,
        cum_mb=cum_bytes,
        cuts=[_cuts_of(r) for r in rounds],
        planner=next((r["plan"].get("method") for r in rounds if isinstance(r.get("plan"), dict)), None),
    )


def _cuts_of(entry: dict[str, Any]) -> list[int]:
    """The clients' cuts of a round (empty if the record has none or they are malformed)."""
    cuts = entry.get("cuts")
    if not isinstance(cuts, dict):
        return []
    return [int(c) for c in cuts.values() if isinstance(c, (int, float)) and not isinstance(c, bool)]


def missing_notes(summaries: Sequence[Summary], metric: str = "test_accuracy") -> list[str]:
    """One line per thing a run lacks (and hence left out of a column or a plot)."""
    notes = []
    any_sim = any(s.cum_sim_s for s in summaries)
    for s in summaries:
        if s.final_accuracy is None:
            notes.append(f"{s.label}: no {metric} in any round: accuracy columns and plots left out")
        elif None in s.accuracy:
            gaps = sum(a is None for a in s.accuracy)
            notes.append(f"{s.label}: {metric} missing in {gaps} of {s.rounds} rounds (not plotted)")
        if s.cum_sim_s is None and any_sim:
            notes.append(f"{s.label}: simulated latency ('sim') missing in some or all rounds: "
                         "simulated values n/a")
        elif s.cum_sim_s is not None and s.sim_energy_j is None:
            notes.append(f"{s.label}: simulated energy missing in some or all rounds: energy n/a")
        if s.cum_mb is None:
            notes.append(f"{s.label}: byte counts missing in some round: bytes plot left out")
    if not any_sim:
        notes.append(f"no run has simulated latency ('sim' in every round): "
                     f"simulated columns and {PLOT_FILES['sim']} left out")
    return notes


# ---------------------------------------------------------------------------------------
# Table


def _fmt(value: Optional[float], digits: int, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def _fmt_sim(value: Optional[float], missing: str = "n/a") -> str:
    """Simulated values span orders of magnitude: at least 2 decimals and 3 significant digits."""
    if value is None:
        return missing
    if value == 0:
        return "0.00"
    decimals = min(8, max(2, 2 - math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


def _columns(summaries: Sequence[Summary], target: float) -> list[tuple[str, Any]]:
    """(header, row -> cell text) of the table; simulated columns only if some run has them."""
    t = f"{target:g}"
    cols: list[tuple[str, Any]] = [
        ("label", lambda s: s.label),
        ("rounds", lambda s: str(s.rounds)),
        ("final acc", lambda s: _fmt(s.final_accuracy, 4)),
        ("best acc (round)", lambda s: "n/a" if s.best_accuracy is None
         else f"{s.best_accuracy:.4f} ({s.best_round})"),
        (f"rounds to {t}", lambda s: "n/a" if s.final_accuracy is None
         else (str(s.reached_round) if s.reached_round is not None else "-")),
    ]
    has_sim = any(s.cum_sim_s for s in summaries)
    if has_sim:
        cols.append((f"sim s to {t}", lambda s: "n/a" if s.cum_sim_s is None or s.final_accuracy is None
                     else _fmt_sim(s.sim_s_to_target, missing="-")))
    cols += [
        ("MB up", lambda s: _fmt(s.mb_up, 2)),
        ("MB down", lambda s: _fmt(s.mb_down, 2)),
        ("wall s", lambda s: _fmt(s.wall_s, 2)),
    ]
    if has_sim:
        cols.append(("sim latency s", lambda s: _fmt_sim(s.sim_latency_s)))
    if any(s.sim_energy_j is not None for s in summaries):
        cols.append(("sim energy J", lambda s: _fmt_sim(s.sim_energy_j)))
    return cols


def format_table(summaries: Sequence[Summary], target: float = DEFAULT_TARGET) -> str:
    """A Markdown table, one row per run, columns padded for reading as plain text.

    Parameters
    ----------
    summaries : sequence of Summary
    target : float
        The target accuracy named in the time-to-target headers.

    Returns
    -------
    str
        The table, without a trailing newline.
    """
    cols = _columns(summaries, target)
    cells = [[h for h, _ in cols]] + [[cell(s) for _, cell in cols] for s in summaries]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]

    def line(row: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


CSV_FIELDS = (
    "label", "history", "rounds", "final_accuracy", "best_accuracy", "best_round",
    "target", "rounds_to_target", "sim_s_to_target", "mb_up", "mb_down", "wall_s",
    "sim_latency_s", "sim_energy_j",
)


def write_csv(path: Path, summaries: Sequence[Summary], target: float) -> None:
    """``summary.csv``: the table's numbers unformatted; an empty cell is not available."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for s in summaries:
            row = [s.label, str(s.path), s.rounds, s.final_accuracy, s.best_accuracy, s.best_round,
                   target, s.reached_round, s.sim_s_to_target, s.mb_up, s.mb_down, s.wall_s,
                   s.sim_latency_s, s.sim_energy_j]
            writer.writerow(["" if v is None else v for v in row])


def write_markdown(path: Path, table: str, notes: Sequence[str], plots: Sequence[Path],
                   target: float, metric: str) -> None:
    """``report.md``: the table, the notes and links to the plots (relative names)."""
    parts = [f"# flsplit report\n\nAccuracy: `{metric}`; target {target:g}.\n", table, ""]
    if notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(parts) + "\n")


# ---------------------------------------------------------------------------------------
# Plots


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


# ---------------------------------------------------------------------------------------
# Command


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` arguments to ``parser`` and set its handler."""
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = "Prints the table; writes report.md, summary.csv and accuracy_vs_*.png into --out."
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directory (holding history.json) or history.json path")
    parser.add_argument("--label", action="append", default=None,
                        help="name of a run in the table and legends; repeat once per RUN, in order "
                             "(default: scheme and run directory name)")
    parser.add_argument("--target", type=_fraction, default=DEFAULT_TARGET,
                        help=f"accuracy for the time-to-target columns (default {DEFAULT_TARGET})")
    parser.add_argument("--metric", choices=METRICS, default="test_accuracy",
                        help="round field used as accuracy (default test_accuracy)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory (default: the run's directory for one RUN, "
                             f"./{MULTI_RUN_OUT} for several)")
    parser.set_defaults(handler=handle)


def default_out(runs: Sequence[Run]) -> Path:
    """The run's directory for one run, ``./flsplit-report`` for several."""
    return runs[0].path.parent if len(runs) == 1 else Path(MULTI_RUN_OUT)


def load_runs(paths: Sequence[str], labels: Optional[Sequence[str]]) -> list[Run]:
    """Load every RUN and apply the labels (one per RUN if given)."""
    if labels is not None and len(labels) != len(paths):
        raise ReportError(f"--label given {len(labels)} times for {len(paths)} runs: give one per RUN")
    runs = [load_run(p) for p in paths]
    names = list(labels) if labels is not None else [r.label for r in runs]
    for run, name in zip(runs, _unique_labels(names)):
        run.label = name
    return runs


def handle(args: argparse.Namespace) -> int:
    """Handler of ``flsplit report``: print the table, write the files, print their paths.

    Returns
    -------
    int
        0 on success, 1 on a ReportError or an output directory that cannot be written.
    """
    try:
        runs = load_runs(args.runs, args.label)
        summaries = [summarize(r, args.target, args.metric) for r in runs]
        out = (args.out or default_out(runs)).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        table = format_table(summaries, args.target)
        notes = missing_notes(summaries, args.metric)
        try:
            plots = write_plots(out, summaries, metric=args.metric, target=args.target)
        except MissingExtra as err:  # the table and CSV need no matplotlib: write them, say why no plots
            print(f"flsplit report: no plots: {err}", file=sys.stderr)
            notes, plots = [*notes, f"no plots: {err}"], []
        write_csv(out / "summary.csv", summaries, args.target)
        write_markdown(out / "report.md", table, notes, plots, args.target, args.metric)
    except ReportError as err:
        print(f"flsplit report: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"flsplit report: error: cannot write {err.filename or 'output'}: {err.strerror or err}",
              file=sys.stderr)
        return 1
    print(table)
    if notes:
        print("\nNotes:")
        print("\n".join(f"- {n}" for n in notes))
    print("\nWrote:")
    for path in [out / "report.md", out / "summary.csv", *plots]:
        print(f"  {path}")
    return 0
