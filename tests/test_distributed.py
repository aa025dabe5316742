"""Several ranks on one run (torchrun / accelerate launch): the work is dealt in one process's batches, the ranks
exchange over gloo, and the run folder is bit-identical to a one-process run's. Several ranks on one training: they
share the recipe's global batch, and a resumed training is bit-identical to an uninterrupted one."""

import errno
import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

from kps_bench.distributed import Ranks, launched
from kps_bench.encoders import ClipEncoder, embed_images
from kps_bench.errors import UserError
from kps_bench.generate import Plan, generate, survey
from kps_bench.lock import RUN_LOCK, exclusive
from kps_bench.models import load_pipeline
from kps_bench.protocol import load_protocol
from kps_bench.rundir import sha256_file


def test_every_item_is_dealt_once_and_each_rank_knows_its_share():
    for world in (1, 2, 3, 5):
        for n, chunk in ((0, 4), (1, 4), (7, 3), (12, 4), (13, 4)):
            batches = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
            shares = [list(Ranks(r, world).mine(batches)) for r in range(world)]
            assert sorted(x for share in shares for b in share for x in b) == list(range(n))
            assert [Ranks(r, world).share(n, chunk) for r in range(world)] == [sum(map(len, s)) for s in shares]
    assert list(Ranks(1, 3).mine("abcdefg")) == ["b", "e"]


def test_a_rank_needs_a_device_of_its_own():
    two = Ranks(0, 2, 0, 2)
    for device in ("cuda:1", "mps"):
        with pytest.raises(UserError, match=f"--device {device} names one device, but 2 processes were launched"):
            two.device(device)
    assert two.device("cpu") == "cpu" and Ranks().device("cuda:1") == "cuda:1"
    if torch.cuda.device_count() < 2:
        with pytest.raises(UserError, match=rf"only {torch.cuda.device_count()} GPU\(s\) are visible here, one per "
                                            r"process is needed\. Launch"):
            two.device("cuda")


def _exchange(rank: int, port: int, results) -> None:
    """One rank of a 2-process gloo launch, as torchrun would set it up."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with launched() as ranks:
        got = {"gather": ranks.gather(lambda: 10 * ranks.rank + 1), "on_main": ranks.on_main(lambda: f"{ranks.rank}"),
               "mine": list(ranks.mine(range(7)))}

        def fails_on_rank_1():
            if ranks.rank == 1:
                raise UserError("bad input on rank 1")

        try:
            ranks.check(fails_on_rank_1)
        except UserError as e:
            got["error"] = str(e)

        def cannot_write_on_rank_0():  # a user error that is not a UserError where it happens (see as_user_error)
            if ranks.rank == 0:
                raise PermissionError(errno.EACCES, "Permission denied", "/shared/runs/x")

        try:
            ranks.check(cannot_write_on_rank_0)
        except Exception as e:  # noqa: BLE001 - the test records what each rank raises
            got["os_error"] = (type(e).__name__, str(e))
    results.put((rank, got))


def test_ranks_exchange_over_gloo_and_a_failure_stops_every_rank():
    """gather (to rank 0), on_main (to all), the deal, and an error on one rank raised on both: none waits. A user
    error that the CLI turns into a message (a path that cannot be written) is a UserError on the other ranks, with
    that message, so they exit 2 as well (they exited 1, "Internal error")."""
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_exchange, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0] == {"gather": [1, 11], "on_main": "0", "mine": [0, 2, 4, 6],
                      "error": "rank 1 of 2 stopped: bad input on rank 1",
                      "os_error": ("PermissionError", "[Errno 13] Permission denied: '/shared/runs/x'")}
    assert got[1] == {"gather": None, "on_main": "0", "mine": [1, 3, 5], "error": "bad input on rank 1",
                      "os_error": ("UserError", "rank 0 of 2 stopped: Cannot access '/shared/runs/x': Permission "
                                                "denied. Choose a path you can write to (e.g. under your home folder) "
                                                "or fix its permissions, then re-run.")}


@pytest.fixture(scope="module")
def shared_plan(tiny_protocol):
    """Two subjects of one class (they share their base images) without an adapter, three images per prompt."""
    protocol = load_protocol(str(tiny_protocol), ["subjects.1.class_noun=block", "generation.images_per_prompt=3"])
    base = load_pipeline(protocol.base_model, protocol.resolve(protocol.base_model), "cpu", "float32", "ddim")
    return protocol, base.pipe, Plan(protocol, list(protocol.subjects), base.identity, None, "cpu")


def test_ranks_make_the_batches_of_one_process_whatever_the_others_wrote(shared_plan, tmp_path):
    """Rank 1 plans from the survey taken before rank 0 wrote its batches, so it makes exactly the rest, and every
    PNG has the bytes of a one-process run (same batches)."""
    protocol, pipe, plan = shared_plan
    g = protocol.generation
    one = generate(pipe, plan.distinct(), g, tmp_path / "one", 4)
    assert one == len(list(plan.distinct())) == 2 * 3 * (1 + 2)  # per prompt and seed: one shared base, 2 triggers
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "stray.png").write_bytes(b"not an image")  # a file that is no job's stays out of the plan
    todo, present = survey(plan.distinct(), tmp_path / "two")
    assert (todo, present) == (one, frozenset())
    made = [generate(pipe, plan.distinct(), g, tmp_path / "two", 4, present=present, ranks=Ranks(r, 2))
            for r in range(2)]
    assert made == [Ranks(r, 2).share(todo, 4) for r in range(2)] == [10, 8]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != "stray.png")
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_ranks_encode_the_batches_of_one_process(tiny, tmp_path):
    """Each rank embeds its share of the encoder batches; together they are the one-process embeddings, bit for bit
    (the same image in a batch of other images could differ in the last bits)."""
    paths = sorted((tiny / "references").rglob("*.png"))
    for i, p in enumerate(paths):  # more distinct images, and one twice
        with Image.open(p) as im:
            im.rotate(90).save(tmp_path / f"{i}.png")
    paths += sorted(tmp_path.glob("*.png")) + paths[:1]
    hashes = [sha256_file(p) for p in paths]
    clip = ClipEncoder(str(tiny / "clip" / "open_clip_config.json"), str(tiny / "clip" / "open_clip_model.safetensors"))
    one = embed_images(paths, clip.encode_images, hashes, 3)
    parts = [embed_images(paths, clip.encode_images, hashes, 3, ranks=Ranks(r, 2)) for r in range(2)]
    assert len(one) == len(paths) - 1
    assert [len(part) for part in parts] == [Ranks(r, 2).share(len(one), 3) for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    merged = {**parts[0], **parts[1]}
    assert merged.keys() == one.keys() and all(torch.equal(merged[h], one[h]) for h in one)


def _kps_bench(*args, launcher=(), env=None):
    return subprocess.run([sys.executable, *launcher, "-m", "kps_bench", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_ranks(*args, cwds) -> list[subprocess.CompletedProcess]:
    """``python -m kps_bench ARGS`` as the ranks of one launch, rank i in the folder ``cwds[i]``, each started here
    with the environment that torchrun gives its workers: so each rank's exit code is seen (torchrun itself exits 1
    whenever a worker fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(len(cwds)), "LOCAL_WORLD_SIZE": str(len(cwds)),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "kps_bench", *map(str, args)], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank, cwd in enumerate(cwds)]
    outputs = [p.communicate(timeout=600) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


@pytest.mark.slow
def test_two_cpu_processes_write_the_run_folder_of_one(tiny, tiny_protocol, tmp_path):
    """`torchrun --nproc_per_node 2 -m kps_bench run --device cpu` (gloo) against one process: every PNG,
    images.jsonl, the embeddings and results.json are the same bytes, but for provenance's times and world size.
    Batches of 3 images and encoder batches of 4 give both ranks a share, the last batches short."""
    args = ["run", "--protocol", tiny_protocol, "--adapter", tiny / "lora", "--subject", "red-block", "--device", "cpu",
            "--batch-size", "3", "--set", "encoders.batch_size=4"]
    one = _kps_bench(*args, "--out", tmp_path / "one", "--cache-dir", tmp_path / "cache-one")
    assert one.returncode == 0, one.stderr
    two = _kps_bench(*args, "--out", tmp_path / "two", "--cache-dir", tmp_path / "cache-two", launcher=TORCHRUN)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Written to") == 1  # rank 0 alone prints the summary
    a, b = tmp_path / "one", tmp_path / "two"
    names = sorted(p.name for p in (a / "images").iterdir())
    # references; base and adapter, each on both prompts
    assert len(names) == 4 + 8 + 8 and names == sorted(p.name for p in (b / "images").iterdir())
    for name in names:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes(), name
    for name in ("images.jsonl", "embeddings.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    pa, pb = ra.pop("provenance"), rb.pop("provenance")
    assert ra == rb
    assert (pa["world_size"], pb["world_size"]) == (1, 2)
    assert pa["images_made"] == pb["images_made"] == {"base": 8, "adapter": 8}
    varying = {"start_time", "end_time", "timings_s", "world_size", "image_cache"}
    assert {k: v for k, v in pa.items() if k not in varying} == {k: v for k, v in pb.items() if k not in varying}
    assert not (b / RUN_LOCK).exists()


@pytest.mark.slow
def test_a_rank_that_fails_stops_the_others(tiny, tiny_protocol, tmp_path):
    """The run folder is locked by another process: rank 0 cannot take the lock and rank 1 stops too, both saying
    why, instead of waiting for each other."""
    out = tmp_path / "run"
    with exclusive(out / RUN_LOCK, f"run folder '{out}'"):
        r = _kps_bench("run", "--protocol", tiny_protocol, "--adapter-kind", "none", "--subject", "red-block",
                       "--device", "cpu", "--out", out, launcher=TORCHRUN)
    output = " ".join(r.stderr.split())
    assert r.returncode != 0
    assert f"Error: The run folder '{out}' is in use by another kps-bench process" in output
    assert f"Error: rank 0 of 2 stopped: The run folder '{out}' is in use" in output
    assert not (out / "images").exists()


@pytest.mark.slow
def test_a_user_error_exits_2_on_every_rank(tiny_protocol, tmp_path):
    """A user error on one rank is a user error on every rank: each prints it and exits 2. Rank 0 finds the run
    folder locked by another process; then the ranks run in two folders (as on two machines without a shared file
    system) and rank 1 cannot see the folder that rank 0 locked."""
    args = ["run", "--protocol", tiny_protocol, "--adapter-kind", "none", "--subject", "red-block", "--device", "cpu",
            "--cache-dir", tmp_path / "cache", "--out", "run"]
    with exclusive(tmp_path / "run" / RUN_LOCK, f"run folder '{tmp_path / 'run'}'"):
        locked = _as_ranks(*args, cwds=[tmp_path, tmp_path])
    machines = [tmp_path / "machine-0", tmp_path / "machine-1"]
    for folder in machines:
        folder.mkdir()
    apart = _as_ranks(*args, cwds=machines)
    assert [r.returncode for r in locked + apart] == [2, 2, 2, 2], [r.stderr for r in locked + apart]
    said = [" ".join(r.stderr.split()) for r in locked + apart]
    assert said[0].startswith("Error: The run folder 'run' is in use by another kps-bench process")
    assert said[1].startswith("Error: rank 0 of 2 stopped: The run folder 'run' is in use by another kps-bench")
    assert said[2].startswith("Error: rank 1 of 2 stopped: Rank 1 does not see the run folder 'run' that rank 0 "
                              "locked: the ranks write one folder. Give an --out on a file system that every machine")
    assert said[3].startswith("Error: Rank 1 does not see the run folder 'run' that rank 0 locked")
    assert not (machines[0] / "run" / RUN_LOCK).exists() and not (machines[1] / "run").exists()


@pytest.mark.slow
def test_a_dry_run_on_two_ranks_is_planned_and_printed_by_rank_0(tiny, tiny_protocol, tmp_path):
    """`run --dry-run` under a launcher: rank 0 plans the whole run and prints it, for two processes; rank 1 prints
    nothing and exits 0. Nothing is written. A user error on rank 0 (an unknown subject) exits 2 on both."""
    args = ["run", "--protocol", tiny_protocol, "--adapter", tiny / "lora", "--device", "cpu", "--cache-dir",
            tmp_path / "cache", "--out", tmp_path / "run", "--dry-run"]
    ok = _as_ranks(*args, "--subject", "red-block", cwds=[tmp_path, tmp_path])
    assert [r.returncode for r in ok] == [0, 0], [r.stderr for r in ok]
    assert ok[1].stdout == ""
    for line in ("base images: 8 to generate, 0 already made", "adapter images: 8 to generate, 0 already made",
                 "clip encoder: 20 images", "estimated time: ", "processes: 2, dealt the generation and encoder "
                 "batches in turn"):
        assert ok[0].stdout.count(line) == 1, ok[0].stdout
    assert not (tmp_path / "run").exists()
    bad = _as_ranks(*args, "--subject", "nosuch", cwds=[tmp_path, tmp_path])
    assert [r.returncode for r in bad] == [2, 2]
    assert " ".join(bad[0].stderr.split()).startswith("Error: Unknown subject 'nosuch' in protocol 'tiny'.")
    assert " ".join(bad[1].stderr.split()).startswith("Error: rank 0 of 2 stopped: Unknown subject 'nosuch'")


# ----------------------------------------------------------------------------- train-baseline on 2 processes (issue 15)

TRAIN = ["train-baseline", "cat", "--subject", "red-block", "--device", "cpu", "--set", "steps=4", "--set",
         "resolution=32", "--set", "checkpoint_every=2", "--set", "gradient_checkpointing=false", "--set",
         "learning_rate=1e-2", "--set", "batch_size=2", "--set", "gradient_accumulation_steps=2"]
STOP_AFTER_2 = """import sys
from kps_bench.protocol import load_protocol
from kps_bench.train import TrainingInterrupted, train
protocol, out, *sets = sys.argv[1:]
try:
    train("cat", load_protocol(protocol), "red-block", out, "cpu", sets, stop_after=2)
except TrainingInterrupted:
    pass
"""


@pytest.mark.slow
def test_two_cpu_processes_share_the_global_batch_and_resume_exactly(tiny_protocol, tmp_path):
    """`torchrun --nproc_per_node 2 -m kps_bench train-baseline` (gloo): the recipe's global batch (batch_size 2 x
    gradient_accumulation_steps 2) is shared as 1 image x 2 accumulation steps per process and recorded as such. A
    launch interrupted after its checkpoint at step 2 keeps each process's own generator state, and resumes to the
    weights and losses of the uninterrupted launch, bit for bit; resuming it with another number of processes is
    refused."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from kps_bench.cli import main
    from kps_bench.models import LORA_FILE
    from kps_bench.train.output import LOG_FILE, TRAINING_JSON, partial_dir

    full = _kps_bench(*TRAIN, "--protocol", tiny_protocol, "--out", tmp_path / "full", launcher=TORCHRUN)
    assert full.returncode == 0, full.stderr
    assert full.stdout.count("Trained cat for 'red-block'") == 1  # rank 0 alone reports
    t = json.loads((tmp_path / "full" / TRAINING_JSON).read_text())
    assert (t["recipe"]["batch_size"], t["recipe"]["gradient_accumulation_steps"], t["num_processes"]) == (2, 2, 2)
    assert t["global_batch_size"] == 4 and t["per_process"] == {"batch_size": 1, "gradient_accumulation_steps": 2}
    assert t["learning_rate_effective"] == 1e-2  # not scaled with the processes

    out = tmp_path / "resumed"
    script = tmp_path / "stop_after_2.py"
    script.write_text(STOP_AFTER_2)
    sets = [a for a in TRAIN[6:] if a != "--set"]
    stopped = subprocess.run([sys.executable, *TORCHRUN, str(script), str(tiny_protocol), str(out), *sets],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert stopped.returncode == 0, stopped.stderr
    checkpoint = partial_dir(out) / "checkpoints" / "step-00000002"
    generators = [torch.load(checkpoint / f"generator_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(*generators)  # each process saved its own stream
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    one = CliRunner().invoke(main, [str(a) for a in TRAIN + ["--protocol", tiny_protocol, "--out", out, "--resume"]])
    assert one.exit_code == 2, one.output
    assert "was made by 2 process(es), and this launch has 1" in " ".join(one.output.split())
    assert checkpoint.is_dir()

    resumed = _kps_bench(*TRAIN, "--protocol", tiny_protocol, "--out", out, "--resume", launcher=TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(tmp_path / "full" / LORA_FILE)), load_file(str(out / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [line.rsplit(",", 1)[0] for line in (p / LOG_FILE).read_text().splitlines()]  # noqa: E731
    assert strip(tmp_path / "full") == strip(out) and len(strip(out)) == 5  # every loss of every step, not the times
    r = json.loads((out / TRAINING_JSON).read_text())
    assert r["resumed_from_step"] == 2 and r["final_loss"] == t["final_loss"]
    assert (r["global_batch_size"], r["per_process"]) == (t["global_batch_size"], t["per_process"])


@pytest.mark.slow
def test_a_global_batch_the_processes_cannot_share_exits_2_on_every_rank(tiny_protocol, tmp_path):
    """batch_size 3 x gradient_accumulation_steps 1 on 2 processes: every rank says why, exits 2, writes nothing."""
    out = tmp_path / "lora"
    ranks = _as_ranks("train-baseline", "lora", *TRAIN[2:], "--set", "batch_size=3", "--set",
                      "gradient_accumulation_steps=1", "--protocol", tiny_protocol, "--out", out,
                      cwds=[tmp_path, tmp_path])
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    for r in ranks:
        assert ("Error: recipe: the global batch of batch_size 3 x gradient_accumulation_steps 1 cannot be shared by 2 "
                "processes") in " ".join(r.stderr.split())
    assert not out.exists() and not (tmp_path / "lora.partial").exists()
