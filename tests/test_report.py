"""``flsplit report``: table, CSV/Markdown and PNG plots from real and synthetic histories."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flsplit import cli

from flsplit.cli import report
from tests.test_learning import run_app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROUNDS = 2


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> list[Path]:
    """Two real run directories (PSL and SL, 2 rounds, 2 nodes, 5 steps a round)."""
    base = tmp_path_factory.mktemp("runs")
    dirs = []
    with pytest.MonkeyPatch.context() as mp:  # the conftest env, at module scope
        mp.setenv("FLWR_HOME", str(base / "flwr-home"))
        mp.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
        mp.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
        mp.setenv("FLWR_TELEMETRY_ENABLED", "0")
        for strategy in ("psl", "sl"):
            run_app(base / strategy, num_nodes=2, strategy=strategy,
                    **{"num-server-rounds": ROUNDS, "max-steps": 5})
            (history,) = (base / strategy / "runs").glob("*/history.json")
            dirs.append(history.parent)
    return dirs


def has_sim(history: dict) -> bool:
    """Every round has a simulated latency."""
    return all("round_latency_s" in (r.get("sim") or {}) for r in history["rounds"])


def load(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())


def expected_label(run_dir: Path) -> str:
    """Default label, computed from the JSON: scheme + run directory name."""
    return f"{load(run_dir)['rounds'][-1]['scheme']} {run_dir.name}"


def table_row(stdout: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is ``label``."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{stdout}")


def table_header(stdout: str) -> list[str]:
    return [c.strip() for c in stdout.splitlines()[0].strip().strip("|").split("|")]


def assert_png(path: Path) -> None:
    """A real, decodable PNG of a plausible figure size."""
    from PIL import Image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        width, height = image.size
    assert width >= 400 and height >= 300
    assert path.stat().st_size > 10_000  # axes, text and lines, not a blank image


def write_history(directory: Path, rounds: list[dict], run: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "history.json"
    path.write_text(json.dumps({"run": run or {"strategy": "sflv2"}, "rounds": rounds, "final_model": None}))
    return path


def sim_rounds() -> list[dict]:
    """4 synthetic rounds with simulated latency and energy."""
    accuracy = [0.3, 0.7, 0.92, 0.95]
    latency = [1.5, 2.0, 2.5, 3.0]
    return [
        {"round": i, "scheme": "SFLV2", "test_accuracy": a, "bytes_up": 2_000_000, "bytes_down": 1_000_000,
         "wall_seconds": 0.5, "sim": {"round_latency_s": t, "energy_j": 0.25}}
        for i, (a, t) in enumerate(zip(accuracy, latency), start=1)
    ]


# -- real runs -------------------------------------------------------------------------------


def test_compare_two_real_runs(real_runs, tmp_path, capsys):
    psl, sl = real_runs
    out = tmp_path / "cmp"
    # one RUN as a directory, one as a history.json path
    assert cli.main(["report", str(psl), str(sl / "history.json"), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out

    header = table_header(stdout)
    assert header[:5] == ["label", "rounds", "final acc", "best acc (round)", "rounds to 0.9"]
    with_sim = all(has_sim(load(d)) for d in real_runs)  # the cost model may be on or off
    assert any(h.startswith("sim") for h in header) == with_sim
    for run_dir in real_runs:
        history = load(run_dir)
        row = dict(zip(header, table_row(stdout, expected_label(run_dir))))
        accuracies = [r["test_accuracy"] for r in history["rounds"]]
        assert row["rounds"] == str(ROUNDS)
        assert row["final acc"] == f"{accuracies[-1]:.4f}"
        assert row["best acc (round)"].startswith(f"{max(accuracies):.4f} (")
        reached = [r["round"] for r in history["rounds"] if r["test_accuracy"] >= 0.9]
        assert row["rounds to 0.9"] == (str(reached[0]) if reached else "-")
        assert row["MB up"] == f"{sum(r['bytes_up'] for r in history['rounds']) / 1e6:.2f}"
        assert row["MB down"] == f"{sum(r['bytes_down'] for r in history['rounds']) / 1e6:.2f}"
        if with_sim:
            latency = sum(r["sim"]["round_latency_s"] for r in history["rounds"])
            assert float(row["sim latency s"]) == pytest.approx(latency, rel=1e-2)

    assert_png(out / "accuracy_vs_round.png")
    assert_png(out / "accuracy_vs_bytes.png")
    if with_sim:
        assert_png(out / "accuracy_vs_sim_time.png")
    else:
        assert not (out / "accuracy_vs_sim_time.png").exists()
        assert "accuracy_vs_sim_time.png left out" in stdout
    for name in ("report.md", "summary.csv", "accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert str(out / name) in stdout

    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [expected_label(d) for d in real_runs]
    for row, run_dir in zip(rows, real_runs):
        rounds = load(run_dir)["rounds"]
        assert float(row["final_accuracy"]) == pytest.approx(rounds[-1]["test_accuracy"])
        assert float(row["wall_s"]) == pytest.approx(sum(r["wall_seconds"] for r in rounds))
        assert (row["sim_latency_s"] != "") == with_sim
    markdown = (out / "report.md").read_text()
    assert expected_label(psl) in markdown and "](accuracy_vs_round.png)" in markdown


def test_console_script_with_labels(real_runs, tmp_path):
    script = Path(sys.executable).with_name("flsplit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flsplit.cli"]
    out = tmp_path / "cli"
    result = subprocess.run(
        [*command, "report", *map(str, real_runs), "--label", "parallel SL", "--label", "vanilla SL",
         "--target", "0.5", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr
    assert "rounds to 0.5" in result.stdout
    for label, run_dir in zip(["parallel SL", "vanilla SL"], real_runs):
        final = load(run_dir)["rounds"][-1]["test_accuracy"]
        assert table_row(result.stdout, label)[2] == f"{final:.4f}"
    assert_png(out / "accuracy_vs_round.png")


def test_single_run_writes_next_to_its_history(real_runs, capsys):
    run_dir = real_runs[0]
    assert cli.main(["report", str(run_dir)]) == 0
    stdout = capsys.readouterr().out
    assert expected_label(run_dir) in stdout
    assert_png(run_dir / "accuracy_vs_round.png")
    assert (run_dir / "report.md").is_file() and (run_dir / "summary.csv").is_file()


# -- synthetic histories -----------------------------------------------------------------------


def test_simulated_time_to_target_and_plot(tmp_path, capsys):
    sim = tmp_path / "sim-run"
    write_history(sim, sim_rounds())
    without = [{k: v for k, v in r.items() if k != "sim"} for r in sim_rounds()]
    plain = write_history(tmp_path / "plain-run", without)
    out = tmp_path / "out"
    assert cli.main(["report", str(sim), str(plain), "--label", "sim", "--label", "plain",
                     "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    header = table_header(stdout)
    row = dict(zip(header, table_row(stdout, "sim")))
    # 0.92 in round 3 is the first >= 0.9; simulated time to the end of round 3 = 1.5 + 2 + 2.5
    assert row["rounds to 0.9"] == "3"
    assert row["sim s to 0.9"] == "6.00"
    assert row["sim latency s"] == "9.00"  # 1.5 + 2 + 2.5 + 3
    assert row["sim energy J"] == "1.00"  # 4 x 0.25
    assert row["MB up"] == "8.00" and row["MB down"] == "4.00" and row["wall s"] == "2.00"
    assert row["final acc"] == "0.9500" and row["best acc (round)"] == "0.9500 (4)"
    other = dict(zip(header, table_row(stdout, "plain")))
    assert other["sim latency s"] == "n/a" and other["sim s to 0.9"] == "n/a"
    assert other["sim energy J"] == "n/a" and other["rounds to 0.9"] == "3"
    assert "plain: simulated latency ('sim') missing" in stdout
    for name in ("accuracy_vs_round.png", "accuracy_vs_sim_time.png", "accuracy_vs_bytes.png"):
        assert_png(out / name)

    # a lower target: round 2 (0.7), after 1.5 + 2.0 simulated seconds
    assert cli.main(["report", str(sim), "--target", "0.6", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    row = dict(zip(table_header(stdout), table_row(stdout, f"SFLV2 {sim.name}")))
    assert row["rounds to 0.6"] == "2" and row["sim s to 0.6"] == "3.50"


def test_partial_history_is_reported_with_gaps(tmp_path, capsys):
    """No test accuracy in some rounds, no sim, ``total_energy_j`` naming: still a report."""
    rounds = sim_rounds()
    rounds[3]["test_accuracy"] = None
    del rounds[1]["test_accuracy"]
    for r in rounds:
        r["sim"] = {"round_latency_s": r["sim"]["round_latency_s"], "total_energy_j": 0.5}
    run = write_history(tmp_path / "partial", rounds)
    no_acc = write_history(tmp_path / "no-acc", [{"round": 1, "scheme": "SL", "bytes_up": 1, "bytes_down": 1,
                                                   "wall_seconds": 1.0}])
    out = tmp_path / "out"
    assert cli.main(["report", str(run), str(no_acc), "--label", "p", "--label", "n", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    header = table_header(stdout)
    row = dict(zip(header, table_row(stdout, "p")))
    assert row["final acc"] == "0.9200"  # the last round that has one
    assert row["sim energy J"] == "2.00"  # 4 x 0.5, under the name total_energy_j
    assert "p: test_accuracy missing in 2 of 4 rounds" in stdout
    none = dict(zip(header, table_row(stdout, "n")))
    assert none["final acc"] == "n/a" and none["rounds to 0.9"] == "n/a"
    assert "n: no test_accuracy in any round" in stdout
    assert_png(out / "accuracy_vs_sim_time.png")


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "nope", "no such file or directory"),
        (lambda d: d, "directory has no history.json"),
        (lambda d: (d / "h.json").write_text("{not json") and d / "h.json", "not a flsplit history (invalid JSON"),
        (lambda d: (d / "h.json").write_text('{"loss": [1, 2]}') and d / "h.json", "not a flsplit history"),
        (lambda d: (d / "h.json").write_text('[{"round": 1}]') and d / "h.json", "not a flsplit history"),
        (lambda d: (d / "h.json").write_text('{"rounds": [{"acc": 1}]}') and d / "h.json",
         "rounds[0] has no 'round'"),
        (lambda d: write_history(d, []), "history has no rounds"),
    ],
    ids=["missing", "empty-dir", "not-json", "no-rounds-key", "list", "bad-round", "empty-rounds"],
)
def test_bad_run_argument_fails_with_a_clear_message(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert cli.main(["report", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "out" / "report.md").exists()


def test_label_count_and_target_are_checked(tmp_path, capsys):
    run = write_history(tmp_path / "r", sim_rounds())
    assert cli.main(["report", str(run), "--label", "a", "--label", "b"]) == 1
    assert "--label given 2 times for 1 runs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(run), "--target", "90"])
    assert exit_info.value.code == 2


def test_subcommand_help_is_the_docstring_first_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert report.__doc__.splitlines()[0] in " ".join(capsys.readouterr().out.split())


def test_repeated_labels_are_made_unique(tmp_path, capsys):
    run = write_history(tmp_path / "r", sim_rounds())
    assert cli.main(["report", str(run), str(run), "--out", str(tmp_path / "o")]) == 0
    stdout = capsys.readouterr().out
    assert table_row(stdout, "SFLV2 r") and table_row(stdout, "SFLV2 r #2")
