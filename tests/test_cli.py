"""The memr2 command line as a user runs it: as a console script and as `python -m memr2`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memr2.cli import main
from memory_service.bench import run_memory_bench

ROOT = Path(__file__).resolve().parents[1]
LOCOMO = ROOT.parent / "shared" / "data" / "locomo" / "locomo10.json"


def test_python_dash_m_runs_without_an_install(tmp_path):
    # As under `ray job submit --working-dir .`: only the working directory is importable.
    out = subprocess.run(
        [sys.executable, "-m", "memr2", "data", "stats", str(tmp_path / "missing.json"), "--json"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"memr2: error: {tmp_path / 'missing.json'}: no such data file"]


@pytest.mark.skipif(not LOCOMO.is_file(), reason="LoCoMo is read from ../shared")
def test_data_stats_json(capsys):
    assert main(["data", "stats", str(LOCOMO), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["turns"] == 5882


def test_bench_memory_reports_every_field_per_size():
    result = run_memory_bench((50, 200))
    assert [r["size"] for r in result["results"]] == [50, 200]
    for row in result["results"]:
        assert set(row) == {"size", "fork_us", "deepcopy_us", "pickle_disk_us", "apply_us", "retrieve_us"}
        assert all(v > 0 for v in row.values())
        assert row["fork_us"] < row["deepcopy_us"]  # a fork shares, a deep copy walks every memory
