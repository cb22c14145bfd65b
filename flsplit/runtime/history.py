"""Run history: one JSON file per run and one readable log line per round.

The file is rewritten (atomically) after every round, so an interrupted run still leaves
its history. Layout::

    {"run": {...settings...}, "rounds": [{"round": 1, "test_accuracy": ..., ...}, ...],
     "final_model": "<path or null>"}

A resumed run (``flsplit.runtime.checkpoint``) continues the history it was saved with and adds
``"resumed": [{"after_round": r, "run": {...its settings...}}, ...]``. A run that failed as a
whole (no node finished any round) has ``"error"``.

A round's ``status`` is ``ok``, ``warning`` (a node dropped or sat out, an evaluation reply
failed) or ``error`` (no sampled node finished the round, or every evaluation reply failed);
its line is logged at that level and says how many nodes finished and why the others did not.
"""

from __future__ import annotations

import json
import os
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Optional

from flwr.common.logger import log

__all__ = ["RunHistory", "format_round"]

_LEVELS = {"ok": INFO, "warning": WARNING, "error": ERROR}
# What a round's error says happened to the node, before the reason: left out of the log line.
_FATES = ("node dropped for this round: ", "node sits out the rest of the round: ", "evaluation failed: ",
          "evaluation: ")
MAX_REASON_CHARS = 200


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _reasons(errors: list[dict[str, Any]]) -> str:
    """The first reason among ``errors`` (short, without what happened to the node), and how
    many other distinct reasons there are."""
    reasons: list[str] = []
    for e in errors:
        reason = str(e.get("error", ""))
        for fate in _FATES:
            if reason.startswith(fate):
                reason = reason[len(fate):]
                break
        if reason not in reasons:
            reasons.append(reason)
    if not reasons:
        return "no error recorded"
    first = reasons[0] if len(reasons[0]) <= MAX_REASON_CHARS else reasons[0][: MAX_REASON_CHARS - 3] + "..."
    return first + (f" (+{len(reasons) - 1} other errors in the history)" if len(reasons) > 1 else "")


def _node_counts(entry: dict[str, Any]) -> list[str]:
    """``nodes 2/3, 1 dropped: <reason>`` and ``eval nodes 1/2, 1 failed: <reason>`` where a
    node did not finish."""
    parts = []
    errors = entry.get("errors") or []
    sampled, finished = entry.get("nodes_sampled"), entry.get("nodes_finished")
    if sampled is not None and finished is not None and finished < sampled:
        dropped = set(entry.get("nodes_dropped") or [])
        mine = [e for e in errors if e.get("stage", "train") == "train" and (not dropped or e.get("node") in dropped)]
        parts.append(f"nodes {finished}/{sampled}, {sampled - finished} dropped: {_reasons(mine)}")
    asked, answered = entry.get("eval_nodes_sampled"), entry.get("eval_nodes_finished")
    if asked is not None and answered is not None and answered < asked:
        mine = [e for e in errors if e.get("stage") == "evaluate"]
        parts.append(f"eval nodes {answered}/{asked}, {asked - answered} failed: {_reasons(mine)}")
    return parts


def format_round(entry: dict[str, Any], num_rounds: Optional[int] = None) -> str:
    """The one-line summary of a round."""
    rnd = f"{entry['round']}/{num_rounds}" if num_rounds else str(entry["round"])
    def number(key: str) -> str:
        value = entry.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    parts = [
        f"round {rnd}",
        f"test acc {number('test_accuracy')}",
        f"test loss {number('test_loss')}" if "test_loss" in entry else f"train loss {number('train_loss')}",
        f"up {_mb(entry['bytes_up'])}",
        f"down {_mb(entry['bytes_down'])}",
        f"{entry['wall_seconds']:.2f} s",
        *_node_counts(entry),
    ]
    return " | ".join(parts)


class RunHistory:
    """Collects per-round records and writes them to ``<directory>/history.json``.

    Parameters
    ----------
    directory : str or Path, optional
        Where the run writes ``history.json`` and ``final_model.pt``; ``None`` keeps the
        history in memory only.
    run : dict, optional
        Settings of the run, stored under ``"run"``.
    """

    def __init__(self, directory: Optional[str | Path] = None, run: Optional[dict] = None) -> None:
        self.directory = Path(directory).expanduser().resolve() if directory else None
        self.data: dict[str, Any] = {"run": dict(run or {}), "rounds": [], "final_model": None}
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Optional[Path]:
        return self.directory / "history.json" if self.directory else None

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.data["rounds"]

    def add_round(self, entry: dict[str, Any], num_rounds: Optional[int] = None) -> None:
        """Append a round, log its line (at the level of its ``status``) and save."""
        self.rounds.append(entry)
        log(_LEVELS.get(entry.get("status", "ok"), INFO), "[flsplit] %s", format_round(entry, num_rounds))
        self.save()

    def resume(self, saved: dict[str, Any], after_round: int) -> None:
        """Continue a saved history (a checkpoint's): its ``run`` and rounds come back, new
        rounds append to them, and this run's settings are noted under ``resumed`` (what this
        run already recorded besides, e.g. ``noop_exchange_seconds``, is kept)."""
        note = {"after_round": int(after_round), "run": self.data["run"]}
        extras = {k: v for k, v in self.data.items() if k not in ("run", "rounds", "final_model")}
        self.data = {**saved, **extras, "rounds": list(saved["rounds"]), "resumed": [*saved.get("resumed", []), note]}

    def save(self) -> None:
        """Write ``history.json`` atomically (no-op without a directory)."""
        if not self.path:
            return
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        os.replace(tmp, self.path)
