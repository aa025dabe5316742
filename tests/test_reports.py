"""Scripts whose output is committed beside the leaderboard: they still print what is committed."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOARD = ROOT / "leaderboard" / "shapes-world"


def test_lambda_sweep_prints_the_committed_table_from_the_validity_study():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lambda_sweep.py"),
                          str(BOARD / "validity" / "validity.json")], capture_output=True, text=True, check=True).stdout
    assert out == (BOARD / "lambda-sweep.md").read_text()
    rows = {r.split(" | ")[0][2:]: [c.strip() for c in r.strip("| ").split("|")] for r in out.splitlines()
            if r.startswith("| ") and not r.startswith("| variant")}
    assert list(rows) == ["base", "lora", "cat-lambda-0", "cat-lambda-0.3", "cat-lambda-1", "cat-lambda-3"]
    assert [rows[v][1] for v in rows] == ["—", "—", "0.0", "0.3", "1.0", "3.0"]
    # each cell's mean is the study's per-adapter value (its mean over subjects) in adapters.csv
    with open(BOARD / "validity" / "adapters.csv", newline="") as f:
        study = {r["adapter"]: r for r in csv.DictReader(f)}
    header = [c.strip() for c in out.splitlines()[0].strip("| ").split("|")]
    for name, cells in rows.items():
        for col in ("kps", "kps_gain", "diversity_ratio", "gt_diversity_ratio"):
            assert cells[header.index(col)].split(" ")[0] == f"{float(study[name][col]):.3f}"
