"""Load the runs ``flsplit report`` reads and summarize each into a table row and plot series.

A RUN is a run directory holding ``history.json`` or the path of one. ``load_run`` checks that
it is a flsplit history with rounds (a ``ReportError`` says what is wrong otherwise);
``summarize`` computes the ``Summary`` the table and the plots show.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["DEFAULT_TARGET", "ReportError", "Run", "Summary", "load_run", "load_runs", "summarize"]

DEFAULT_TARGET = 0.9


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


def load_runs(paths: Sequence[str], labels: Optional[Sequence[str]]) -> list[Run]:
    """Load every RUN and apply the labels (one per RUN if given)."""
    if labels is not None and len(labels) != len(paths):
        raise ReportError(f"--label given {len(labels)} times for {len(paths)} runs: give one per RUN")
    runs = [load_run(p) for p in paths]
    names = list(labels) if labels is not None else [r.label for r in runs]
    for run, name in zip(runs, _unique_labels(names)):
        run.label = name
    return runs


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
