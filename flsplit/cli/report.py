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
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from flsplit.extras import MissingExtra
from flsplit.cli.report_plots import PLOT_FILES, write_plots
from flsplit.cli.report_runs import DEFAULT_TARGET, ReportError, Run, Summary, load_runs, summarize

__all__ = ["add_arguments", "format_table", "handle", "missing_notes"]

MULTI_RUN_OUT = "flsplit-report"
METRICS = ("test_accuracy", "eval_accuracy", "train_accuracy")


# ---------------------------------------------------------------------------------------
# Notes, table, CSV and Markdown


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
