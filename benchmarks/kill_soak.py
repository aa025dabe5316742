"""Kill soak: ``kill -9`` ``kps-bench run`` and ``train-baseline`` at random moments, resume, and check that every
resumed result is bit-identical to an uninterrupted one, with no temporary or lock file left.

    python benchmarks/kill_soak.py                  # 20 kills of run, 10 of train-baseline, on tiny models
    python benchmarks/kill_soak.py --runs 3 --trains 2 --tiny DIR

Runs kill during model loading, generation, encoding, scoring and the writing of results.json (the phases' windows
come from the uninterrupted reference run; the writing kill fires when results.json's temporary file appears).
Compared: every PNG, images.jsonl, embeddings.safetensors and results.json without its provenance; for trainings
every adapter file, training.json's files, losses and recipe, and train_log.csv without its elapsed_s column.
Exit status 0 when every kill was survived.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_PHASES = ("loading", "generation", "encoding", "scoring", "writing results.json")
TRAIN_SET = ["steps=8", "resolution=32", "checkpoint_every=2", "gradient_checkpointing=false"]
POLL_S = 0.0005


def kps(*args: str) -> list[str]:
    return [sys.executable, "-m", "kps_bench", *args]


def run_cmd(tiny: Path, out: Path) -> list[str]:
    return kps("run", "--protocol", str(tiny / "tiny.yaml"), "--adapter", str(tiny / "lora"), "--subject",
               "red-block", "--out", str(out), "--device", "cpu")


def train_cmd(tiny: Path, out: Path, method: str, resume: bool) -> list[str]:
    sets = [a for s in TRAIN_SET for a in ("--set", s)]
    return kps("train-baseline", method, "--protocol", str(tiny / "tiny.yaml"), "--subject", "red-block", "--out",
               str(out), "--device", "cpu", *sets, *(["--resume"] if resume else []))


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout}{r.stderr}")


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*")] if folder.is_dir() else []


def writing(out: Path) -> bool:
    return any(p.name.startswith(".results.json.") for p in temporaries(out))


def use_cache(work: Path, name: str) -> Path:
    """``work/name``, with a fresh image cache of its own for the commands started next (so each trial makes its
    images, and kills can land in cache writes)."""
    os.environ["KPS_BENCH_CACHE"] = str(work / "caches" / name)
    return work / name


def cache_leftovers(work: Path, name: str) -> list[str]:
    return [f"left behind in the image cache: {p.name}" for p in temporaries(work / "caches" / name)]


# ----------------------------------------------------------------------------- run


def generated(out: Path) -> int:
    return len(list(out.glob("images/[!r]*.png")))  # not the references (ref-*.png)


def reference_run(tiny: Path, out: Path, attempts: int = 5) -> dict:
    """Run once without a kill, watching the folder. Returns each phase's window as (event, start, end): seconds
    after the event ("launch", "images/ created", "all images made") in which the phase ran. results.json's
    temporary file can live for less than a poll (writing a 12 KB results.json takes 0.3 ms), so the poll can miss
    it: the run is then made again from scratch (its folder and image cache removed), up to ``attempts`` times."""
    for _ in range(attempts):
        if (windows := watch_run(tiny, out)) is not None:
            return windows
        shutil.rmtree(out)
        shutil.rmtree(os.environ["KPS_BENCH_CACHE"], ignore_errors=True)
    raise SystemExit(f"the reference run was too fast to watch in {attempts} attempts; rerun")


def watch_run(tiny: Path, out: Path) -> dict | None:
    """:func:`reference_run`'s windows from one run, or None when the poll missed an event."""
    t0, proc = time.perf_counter(), start(run_cmd(tiny, out))
    t_images = t_last = t_write = None
    count = 0
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if t_images is None and (out / "images").is_dir():
            t_images = now
        if (n := generated(out)) != count:
            count, t_last = n, now
        if t_write is None and writing(out):
            t_write = now
        time.sleep(POLL_S)
    if proc.returncode:
        finish(run_cmd(tiny, out))  # says why it failed (a run that fails only now and then is watched again)
    if proc.returncode or None in (t_images, t_last, t_write):
        return None
    timings = json.loads((out / "results.json").read_text())["provenance"]["timings_s"]
    scoring = t_write - t_last
    encoding = scoring * timings["encode"] / (timings["encode"] + timings.get("metrics", 0) + 1e-9)
    return {"loading": ("launch", 0.0, t_images), "generation": ("images/ created", 0.0, t_last - t_images),
            "encoding": ("all images made", 0.0, encoding), "scoring": ("all images made", encoding, scoring),
            "images": count}


def kill_run(tiny: Path, out: Path, phase: str, windows: dict, rng: random.Random) -> bool:
    """Start a run and kill it in ``phase``; False when it finished first."""
    proc = start(run_cmd(tiny, out))
    event, lo, hi = windows.get(phase, ("writing", 0.0, 0.0))
    happened = {"launch": lambda: True, "images/ created": lambda: (out / "images").is_dir(),
                "all images made": lambda: generated(out) == windows["images"], "writing": lambda: writing(out)}[event]
    while proc.poll() is None and not happened():
        time.sleep(POLL_S)
    time.sleep(rng.uniform(lo, hi))
    if proc.poll() is not None:
        shutil.rmtree(out)
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def run_state(out: Path) -> str:
    """What a killed run had written: generated images, temporary files, lock, results."""
    if not out.is_dir():
        return "no folder yet"
    left = [p.name for p in temporaries(out)]
    return (f"{generated(out)} image(s), {len(left) - left.count('.kps-bench.lock')} temporary file(s)"
            f"{', lock file' if '.kps-bench.lock' in left else ''}{', results.json' if (out / 'results.json').is_file() else ''}")


def file_sets(ref: Path, got: Path) -> tuple[list[str], list[Path]]:
    """Problems with which files ``got`` holds (temporaries, missing, extra) and the files both hold."""
    problems = [f"left behind: {p.relative_to(got)}" for p in temporaries(got)]
    files = {p.relative_to(ref) for p in ref.rglob("*") if p.is_file()}
    have = {p.relative_to(got) for p in got.rglob("*") if p.is_file() and not p.name.startswith(".")}
    problems += [f"missing: {p}" for p in sorted(files - have)] + [f"extra: {p}" for p in sorted(have - files)]
    return problems, sorted(files & have)


def compare_runs(ref: Path, got: Path) -> list[str]:
    problems, common = file_sets(ref, got)
    for rel in common:
        if rel.name == "results.json":
            a, b = (json.loads((d / rel).read_text()) for d in (ref, got))
            a.pop("provenance"), b.pop("provenance")
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                problems.append("results.json: metrics differ")
        elif (ref / rel).read_bytes() != (got / rel).read_bytes():
            problems.append(f"differs: {rel}")
    return problems


# ----------------------------------------------------------------------------- train-baseline


def reference_train(tiny: Path, out: Path, method: str) -> float:
    t0 = time.perf_counter()
    finish(train_cmd(tiny, out, method, resume=False))
    return time.perf_counter() - t0


def train_state(out: Path) -> str:
    partial = out.with_name(out.name + ".partial")
    if out.is_dir():
        return "finished"
    if not partial.is_dir():
        return "loading"
    if (partial / "training.json").is_file():
        return "finishing"
    return "training, after a checkpoint" if list(partial.glob("checkpoints/step-*")) else "training"


def compare_trainings(ref: Path, got: Path) -> list[str]:
    problems, common = file_sets(ref, got)
    problems = [f"left behind: {p.name}" for p in got.parent.glob(f"*{got.name}*") if p.name != got.name] + problems
    for rel in common:
        if rel.name == "training.json":
            a, b = (json.loads((d / rel).read_text()) for d in (ref, got))
            for d in (a, b):
                d["files"].pop("train_log.csv")  # its elapsed_s column differs; compared below without it
            for key in ("files", "final_loss", "recipe_sha256", "steps", "captions", "base_model"):
                if a.get(key) != b.get(key):
                    problems.append(f"training.json: {key} differs")
        elif rel.name == "train_log.csv":
            a, b = ([{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(open(d / rel))]
                    for d in (ref, got))
            if a != b:
                problems.append("train_log.csv: losses differ")
        elif (ref / rel).read_bytes() != (got / rel).read_bytes():
            problems.append(f"differs: {rel}")
    return problems


def kill_train(tiny: Path, out: Path, method: str, at: float) -> str | None:
    """Start a training, kill it ``at`` seconds in, and return what it had reached (None when it finished first)."""
    proc = start(train_cmd(tiny, out, method, resume=False))
    try:
        proc.wait(timeout=at)
        shutil.rmtree(out.parent)
        return None
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return train_state(out)


# ----------------------------------------------------------------------------- main


def soak(tiny: Path, work: Path, runs: int, trains: int, methods: list[str], seed: int) -> int:
    rng = random.Random(seed)
    failures = 0
    if runs:
        windows = reference_run(tiny, use_cache(work, "run-ref"))
        print("run phases in the reference run: " + ", ".join(f"{k} {windows[k][1]:.2f}-{windows[k][2]:.2f} s after {windows[k][0]}" for k in RUN_PHASES[:4]))
        survived = attempted = 0
        for i in range(runs):
            phase = RUN_PHASES[i % len(RUN_PHASES)]
            out = use_cache(work, f"run-{i:02d}")
            for _ in range(5):  # a kill that came after the run had finished is tried again
                if kill_run(tiny, out, phase, windows, rng):
                    break
            else:
                print(f"run kill {i + 1:2d} ({phase}): the run finished before every kill; skipped")
                continue
            attempted += 1
            state = run_state(out)
            finish(run_cmd(tiny, out))
            problems = compare_runs(work / "run-ref", out) + cache_leftovers(work, out.name)
            survived += not problems
            print(f"run kill {i + 1:2d} ({phase}; at the kill: {state}): "
                  f"{'identical' if not problems else 'MISMATCH: ' + '; '.join(problems)}")
        print(f"run: {survived}/{attempted} kills survived, {attempted - survived} mismatch(es)")
        failures += attempted - survived + (runs - attempted)
    if trains:
        refs = {m: (work / f"train-ref-{m}", reference_train(tiny, use_cache(work, f"train-ref-{m}"), m))
                for m in methods[:trains]}
        survived = attempted = 0
        for i in range(trains):
            method = methods[i % len(methods)]
            ref, duration = refs[method]
            out = use_cache(work, f"train-{i:02d}") / "adapter"
            for _ in range(5):
                state = kill_train(tiny, out, method, rng.uniform(0.0, duration))
                if state is not None:
                    break
            else:
                print(f"train kill {i + 1:2d} ({method}): the training finished before every kill; skipped")
                continue
            attempted += 1
            if state != "finished":
                finish(train_cmd(tiny, out, method, resume=out.with_name("adapter.partial").is_dir()))
            problems = compare_trainings(ref, out) + cache_leftovers(work, out.parent.name)
            survived += not problems
            print(f"train kill {i + 1:2d} ({method}, {state}): "
                  f"{'identical' if not problems else 'MISMATCH: ' + '; '.join(problems)}")
        print(f"train-baseline: {survived}/{attempted} kills survived, {attempted - survived} mismatch(es)")
        failures += attempted - survived + (trains - attempted)
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="kills of `kps-bench run` (default 20)")
    ap.add_argument("--trains", type=int, default=10, help="kills of `kps-bench train-baseline` (default 10)")
    ap.add_argument("--methods", default="lora,textual-inversion,cat,dreambooth",
                    help="trainers to kill, in turn (default all four)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--tiny", type=Path, help="folder of `kps-bench tiny-models` (default: built in --work)")
    ap.add_argument("--work", type=Path, help="folder for the runs and adapters (default: a temporary folder)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="kill-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny = a.tiny
    if tiny is None:
        tiny = work / "tiny"
        finish(kps("tiny-models", "--out", str(tiny)))
    print(f"kill soak in {work} (tiny models {tiny}, seed {a.seed})")
    return soak(tiny, work, a.runs, a.trains, a.methods.split(","), a.seed)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
