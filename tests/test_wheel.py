"""The wheel, installed (not editable) in a fresh virtual environment, runs from outside the repository: it ships
the protocols, the training recipes and the shapes world."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".benchmarks", "leaderboard", "kps-bench-demo", "runs", "tmp")


def _sh(args, **kw):
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kw)
    print(f"$ {' '.join(Path(str(a)).name if i == 0 else str(a) for i, a in enumerate(args))}\n{out.stdout[-1500:]}"
          f"{out.stderr[-1500:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_the_installed_wheel_runs_trains_and_lists_protocols_outside_the_repository(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)  # a clean tree: no stale build/ can leak into the wheel
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src, "-w", tmp_path / "dist"])
    (wheel,) = (tmp_path / "dist").glob("kps_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("protocols", "kps_bench/protocols"), ("baselines", "kps_bench/baselines"),
                            ("kps_bench/studies", "kps_bench/studies")):
        shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith(package + "/") and n.endswith(".yaml")}
        assert shipped == {p.name for p in (REPO / folder).glob("*.yaml")}  # every file, from its one copy
    assert "kps_bench/world/shapes-world/pipeline/model_index.json" in names

    # a fresh environment that sees this one's packages (torch is not installed twice) but not its kps_bench
    env = tmp_path / "env"
    _sh([sys.executable, "-m", "venv", "--without-pip", env])
    python = env / "bin" / "python"
    site = Path(_sh([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])

    outside = tmp_path / "outside"
    outside.mkdir()
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "KPS_BENCH_PROTOCOLS", "KPS_BENCH_BASELINES")}
    environ["HF_HUB_OFFLINE"] = "1"
    kps = env / "bin" / "kps-bench"

    def cli(*args):
        return _sh([kps, *args], cwd=outside, env=environ)

    where = _sh([python, "-c", "import kps_bench; print(kps_bench.__file__)"], cwd=outside, env=environ)
    assert Path(where.strip()).is_relative_to(site)
    listed = dict(line.split("\t") for line in cli("protocols", "list").splitlines())
    assert {"shapes-world", "dreambench", "dreambench-quick"} <= set(listed)
    assert all(Path(p).is_relative_to(site / "kps_bench" / "protocols") for p in listed.values())

    small = ["--set", "generation.steps=2", "--set", "generation.images_per_prompt=2", "--device", "cpu"]
    cli("run", "--adapter-kind", "none", "--subject", "purple-circle", "--out", "base", *small)
    results = json.loads((outside / "base" / "results.json").read_text())
    assert results["provenance"]["protocol_name"] == "shapes-world" and results["counts"]["base"] > 0
    assert 0 < results["metrics"]["purple-circle"]["identity"]["value"] <= 1

    cli("train-baseline", "lora", "--subject", "purple-circle", "--out", "lora", "--set", "steps=5", "--device", "cpu")
    training = json.loads((outside / "lora" / "training.json").read_text())
    assert training["steps"] == 5 and (outside / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert Path(training["recipe_sources"][0]) == site / "kps_bench" / "baselines" / "lora.yaml"
