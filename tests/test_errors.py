"""Every bad input of `run` and `score` gets a clear message and exit code 2, and leaves nothing half-written."""

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from kps_bench.cli import main
from kps_bench.errors import UserError
from kps_bench.generate import oom_guard

from clitools import cli, expect_user_error


def run_args(tiny_protocol, out, *extra):
    return ["run", "--protocol", tiny_protocol, "--out", out, "--device", "cpu", *extra]


def test_missing_protocol(tmp_path):
    expect_user_error(cli("run", "--protocol", tmp_path / "nope.yaml"), "does not exist")


def test_unknown_field_named_with_file(protocol_copy):
    p = protocol_copy(colour="red")
    expect_user_error(cli("protocols", "validate", p), "unknown field 'colour'", str(p))


def test_bad_set(tiny_protocol, tmp_path):
    expect_user_error(cli(*run_args(tiny_protocol, tmp_path / "o"), "--set", "generation.steps=lots"),
                      "generation.steps", "integer")


def test_missing_adapter(tiny_protocol, tmp_path):
    expect_user_error(cli(*run_args(tiny_protocol, tmp_path / "o"), "--adapter", tmp_path / "nope"),
                      "Adapter path", "does not exist")


def test_corrupt_safetensors(tiny_protocol, tmp_path):
    bad = tmp_path / "lora"
    bad.mkdir()
    (bad / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    expect_user_error(cli(*run_args(tiny_protocol, tmp_path / "o"), "--adapter", bad, "--adapter-kind", "lora",
                          "--subject", "red-block"), "not a valid safetensors file")


def test_pickle_refused_without_flag(tiny_protocol, tmp_path):
    f = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, f)
    expect_user_error(cli(*run_args(tiny_protocol, tmp_path / "o"), "--adapter", f, "--subject", "red-block"),
                      "pickle", "--allow-unsafe-pickle")


def test_lora_that_matches_nothing(tiny_protocol, tmp_path):
    d = tmp_path / "wrong-lora"
    d.mkdir()
    save_file({"unet.no_such_block.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such_block.attn.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(d / "pytorch_lora_weights.safetensors"))
    r = cli(*run_args(tiny_protocol, tmp_path / "o"), "--adapter", d, "--subject", "red-block")
    expect_user_error(r, "matched 0 of its 1 modules")


def test_textual_inversion_token_already_in_tokenizer(tiny, tmp_path, protocol_copy):
    p = protocol_copy()
    r = cli(*run_args(p, tmp_path / "o"), "--adapter", tiny / "textual-inversion", "--subject", "red-block",
            "--set", "subjects.0.trigger=in")  # "in" is a CLIP token
    expect_user_error(r, "'in' already exists in the base model's tokenizer")


@pytest.mark.parametrize("case", ["missing", "empty", "not-images", "corrupt"])
def test_bad_reference_folders(tiny, tmp_path, protocol_copy, case):
    refs = tmp_path / "refs"
    if case != "missing":
        refs.mkdir()
    if case == "not-images":
        (refs / "notes.txt").write_text("hello")
    if case == "corrupt":
        (refs / "a.png").write_bytes(b"not a png")
    subjects = yaml.safe_load((tiny / "tiny.yaml").read_text())["subjects"]
    subjects[0]["references"] = str(refs)
    p = protocol_copy(subjects=subjects)
    expected = {"missing": "does not exist", "empty": "is empty", "not-images": "holds no images",
                "corrupt": "not a readable image"}[case]
    expect_user_error(cli(*run_args(p, tmp_path / "o")), "subjects[red-block].references", expected)


def test_adapter_without_subject_on_a_multi_subject_protocol(tiny, tiny_protocol, tmp_path):
    expect_user_error(cli(*run_args(tiny_protocol, tmp_path / "o"), "--adapter", tiny / "lora"), "--subject NAME")


def test_unknown_subject(tiny_protocol, tmp_path):
    expect_user_error(cli(*run_args(tiny_protocol, tmp_path / "o"), "--subject", "cat"), "Unknown subject 'cat'")


def test_out_of_memory_names_the_knob():
    with pytest.raises(UserError, match="batch size 16. Lower it with --batch-size"):
        with oom_guard("generating images", 16, "--batch-size"):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_score_bad_manifests(tiny_protocol, tmp_path):
    expect_user_error(cli("score", "--manifest", tmp_path / "none.jsonl", "--protocol", tiny_protocol, "--out",
                          tmp_path / "o"), "does not exist")
    m = tmp_path / "images.jsonl"
    m.write_text('{"id": "a", "path": "a.png", "role": "adapter"}\n')
    expect_user_error(cli("score", "--manifest", m, "--protocol", tiny_protocol, "--out", tmp_path / "o"),
                      "line 1", "missing field 'subject'")
    m.write_text('{"id": "a", "path": "a.png", "role": "adapter", "subject": "red-block", '
                 '"prompt_without_trigger": "a block"}\n')
    expect_user_error(cli("score", "--manifest", m, "--protocol", tiny_protocol, "--out", tmp_path / "o"),
                      "does not exist")
    assert not (tmp_path / "o" / "results.json").exists()


def test_black_images_are_flagged_and_counted(tiny_protocol, tmp_path):
    import numpy as np
    from PIL import Image

    rows = []
    for k in range(2):
        for trig, role in ((False, "base"), (False, "adapter"), (True, "adapter")):
            name = f"{role}-{trig}-{k}.png"
            value = 0 if (role == "adapter" and trig and k == 0) else 60 + 40 * k
            Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(tmp_path / name)
            rows.append({"id": name, "path": name, "role": role, "subject": "red-block", "seed": k,
                         "prompt": "a sks block" if trig else "a block", "prompt_without_trigger": "a block",
                         "has_trigger": trig})
    (tmp_path / "images.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = cli("score", "--manifest", tmp_path / "images.jsonl", "--protocol", tiny_protocol, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["counts"]["flagged"] == 1 and res["counts"]["flagged_ids"] == ["adapter-True-0.png"]
    assert res["metrics"]["red-block"]["clip_i"]["n"] == 4  # 1 valid trigger image x 4 references
    scored = [json.loads(line) for line in (tmp_path / "o" / "images.jsonl").read_text().splitlines()]
    assert [x["flags"] for x in scored if x["id"] == "adapter-True-0.png"] == [["black"]]


def test_internal_errors_exit_1_and_point_to_debug(tiny_protocol, monkeypatch):
    import kps_bench.protocol

    def bug(*args, **kwargs):
        return {}["no such key"]  # a true bug, not bad input

    monkeypatch.setattr(kps_bench.protocol, "load_protocol", bug)
    r = cli("protocols", "show", tiny_protocol)
    assert r.exit_code == 1, r.output
    assert "Internal error: KeyError: 'no such key'" in r.output and "--debug" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["--debug", "protocols", "show", str(tiny_protocol)])
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)  # --debug lets the traceback through


def test_debug_shows_user_errors_as_exceptions(tmp_path):
    r = CliRunner().invoke(main, ["--debug", "run", "--protocol", str(tmp_path / "nope.yaml")])
    assert r.exit_code != 0 and isinstance(r.exception, UserError)


def test_help_explains_options():
    r = cli("run", "--help")
    assert r.exit_code == 0
    for opt in ("--protocol", "--adapter", "--adapter-kind", "--subject", "--out", "--device", "--dtype",
                "--batch-size", "--set", "--allow-unsafe-pickle"):
        assert opt in r.output


# ----------------------------------------------------------------------------- issue 17: a corpus of malformed inputs

RANDOM = bytes(__import__("random").Random(17).randrange(256) for _ in range(512))
UNWRITABLE = "/sys/kps-bench-test/out"  # a read-only file system, even for root


@pytest.fixture(scope="module")
def base_run(tiny_protocol, tmp_path_factory):
    from kps_bench.protocol import load_protocol
    from kps_bench.run import RunOptions, run_benchmark

    out = tmp_path_factory.mktemp("base-run")
    run_benchmark(load_protocol(str(tiny_protocol)), RunOptions(out=out, adapter_kind="none", subjects=("red-block",),
                                                                device="cpu"))
    return out


def _manifest(tmp_path, rows=None, raw=None):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.png").write_text("not an image")
    m = tmp_path / "m.jsonl"
    if raw is not None:
        m.write_bytes(raw)
    else:
        base = {"id": "a", "path": "a.png", "role": "adapter", "subject": "red-block", "seed": 0,
                "prompt": "a sks block", "prompt_without_trigger": "a block", "has_trigger": True}
        m.write_text("\n".join(json.dumps({**base, **r}) if isinstance(r, dict) else r for r in rows))
    return m


def _adapter(tiny, tmp_path, training=None, **files):
    d = tmp_path / "adapter"
    shutil.copytree(tiny / "lora", d)
    if training is not None:
        (d / "training.json").write_text(training)
    for name, data in files.items():
        (d / name.replace("__", ".")).write_bytes(data)
    return d


def _score(tp, m, out, *extra):
    return ["score", "--manifest", m, "--protocol", tp, "--out", out, "--device", "cpu", *extra]


CORPUS = {
    "protocol random bytes (run)": (lambda c: ["run", "--protocol", c.file("r.yaml", RANDOM), "--out", c.out],
                                    "is not UTF-8 text"),
    "protocol random bytes (show)": (lambda c: ["protocols", "show", c.file("r.yaml", RANDOM)], "is not UTF-8 text"),
    "protocol random bytes (validate)": (lambda c: ["protocols", "validate", c.file("r.yaml", RANDOM)],
                                         "is not UTF-8 text"),
    "protocol latin-1": (lambda c: ["protocols", "show", c.file("l.yaml", b"name: caf\xe9\n")], "is not UTF-8 text"),
    "protocol empty": (lambda c: ["run", "--protocol", c.file("e.yaml", b""), "--out", c.out],
                       "must hold a mapping of fields"),
    "--set not UTF-8 (show)": (lambda c: ["protocols", "show", c.tp, "--set", "name=caf\udce9"],
                               "is not valid UTF-8 text"),
    "--set not UTF-8 (run)": (lambda c: ["run", "--protocol", c.tp, "--out", c.out, "--set", "name=caf\udce9"],
                              "is not valid UTF-8 text"),
    "--set unknown field": (lambda c: ["protocols", "show", c.tp, "--set", "foo=1"],
                            "--set foo: unknown field 'foo'. Allowed fields: name, version, description, base_model, "
                            "generation, encoders, subjects, prompts,"),
    "--set unknown nested field": (lambda c: ["protocols", "show", c.tp, "--set", "generation.stpes=3"],
                                   "--set generation.stpes: unknown field 'generation.stpes'. Allowed fields of "
                                   "generation: scheduler, steps,"),
    "empty protocol name": (lambda c: ["protocols", "show", c.tp, "--set", "name="],
                            "field 'name' must be a non-empty string"),
    "infinite guidance": (lambda c: ["protocols", "show", c.tp, "--set", "generation.guidance_scale=.inf"],
                          "field 'generation.guidance_scale' must be a finite number, got inf"),
    "--device tpu (run)": (lambda c: ["run", "--protocol", c.tp, "--out", c.out, "--device", "tpu"],
                           "--device 'tpu' is not a device kps-bench can use. Give one of: auto, cpu, cuda, cuda:N"),
    "--device tpu (score)": (lambda c: _score(c.tp, _manifest(c.tmp, [{}]), c.out, "--device", "tpu"),
                             "--device 'tpu' is not a device"),
    "--device tpu (train)": (lambda c: ["train-baseline", "lora", "--protocol", c.tp, "--subject", "red-block",
                                        "--out", c.out, "--device", "tpu"], "--device 'tpu' is not a device"),
    "training.json is a list": (lambda c: ["run", "--protocol", c.tp, "--out", c.out, "--device", "cpu",
                                           "--adapter", _adapter(c.tiny, c.tmp, "[]")],
                                "training.json' must hold a JSON object (method, subject, recipe, ...), got a list"),
    "training.json empty": (lambda c: ["run", "--protocol", c.tp, "--out", c.out, "--device", "cpu",
                                       "--adapter", _adapter(c.tiny, c.tmp, "")], "is not valid JSON"),
    "training.json names an unknown subject": (
        lambda c: ["run", "--protocol", c.tp, "--out", c.out, "--device", "cpu",
                   "--adapter", _adapter(c.tiny, c.tmp, '{"subject": "green-cone"}')],
        "The adapter's training.json (next to"),
    "adapter file empty": (lambda c: ["run", "--protocol", c.tp, "--out", c.out, "--device", "cpu", "--subject",
                                      "red-block", "--adapter",
                                      _adapter(c.tiny, c.tmp, pytorch_lora_weights__safetensors=b"")],
                           "is not a valid safetensors file"),
    "manifest empty": (lambda c: _score(c.tp, _manifest(c.tmp, raw=b""), c.out),
                       "lists no base or adapter image (role 'base' or 'adapter'), so there is nothing to score"),
    "manifest of references only": (lambda c: _score(c.tp, _manifest(c.tmp, [{"role": "reference"}]), c.out),
                                     "lists no base or adapter image"),
    "manifest random bytes": (lambda c: _score(c.tp, _manifest(c.tmp, raw=RANDOM), c.out), "is not UTF-8 text"),
    "manifest line is a list": (lambda c: _score(c.tp, _manifest(c.tmp, ["[1, 2]"]), c.out),
                                "line 1: must be a JSON object"),
    "manifest path not an image": (lambda c: _score(c.tp, _manifest(c.tmp, [{"path": "notes.png"}]), c.out),
                                   "which is not a readable image"),
    "manifest path outside its folder": (lambda c: _score(c.tp, _manifest(c.tmp, [{"path": "/etc/passwd"}]), c.out),
                                         "outside the manifest's folder"),
    "manifest path climbing out": (lambda c: _score(c.tp, _manifest(c.tmp, [{"path": "../a.png"}]), c.out),
                                   "outside the manifest's folder"),
    "manifest seed not an integer": (lambda c: _score(c.tp, _manifest(c.tmp, [{"seed": "abc"}]), c.out),
                                     "line 1: field 'seed' must be an integer, got 'abc'"),
    "manifest has_trigger a string": (lambda c: _score(c.tp, _manifest(c.tmp, [{"has_trigger": "false"}]), c.out),
                                      "field 'has_trigger' must be true or false (a JSON boolean), got 'false'"),
    "manifest null id": (lambda c: _score(c.tp, _manifest(c.tmp, [{"id": None}]), c.out),
                         "field 'id' must be a non-empty string, got None"),
    "manifest wrong sha256": (lambda c: _score(c.tp, _manifest(c.tmp, [{"sha256": "0" * 64}]), c.out),
                              "the file changed since the manifest was written"),
    "run --out not writable": (lambda c: ["run", "--protocol", c.tp, "--out", UNWRITABLE, "--device", "cpu"],
                               f"--out '{UNWRITABLE}' cannot be written"),
    "score --out not writable": (lambda c: _score(c.tp, _manifest(c.tmp, [{}]), UNWRITABLE),
                                 f"--out '{UNWRITABLE}' cannot be written"),
    "tiny-models --out not writable": (lambda c: ["tiny-models", "--out", UNWRITABLE], "cannot be written"),
    "train-baseline --out not writable": (lambda c: ["train-baseline", "lora", "--protocol", c.tp, "--subject",
                                                     "red-block", "--out", UNWRITABLE, "--device", "cpu"],
                                          "cannot be written"),
    "leaderboard --out not writable": (lambda c: ["leaderboard", c.run, "--out", f"{UNWRITABLE}/board.md"],
                                       "cannot be written"),
    "tiny-models into a folder with files": (lambda c: ["tiny-models", "--out", c.tiny],
                                             "already holds files, which tiny-models would overwrite"),
    "leaderboard: results.json empty": (lambda c: ["leaderboard", c.copy_run(**{"results.json": b""})],
                                        "is not valid JSON"),
    "leaderboard: images.jsonl random bytes": (lambda c: ["leaderboard", c.copy_run(**{"images.jsonl": RANDOM})],
                                               "is inconsistent: its images.jsonl is not the one"),
    "leaderboard: embeddings empty": (lambda c: ["leaderboard", c.copy_run(**{"embeddings.safetensors": b""})],
                                      "is inconsistent: its embeddings.safetensors"),
    "world truth on a run that is not a shapes-world run": (lambda c: ["world", "truth", c.copy_run()],
                                                            "is not a shapes-world run"),
    "base_model: a missing folder": (lambda c: ["run", "--protocol", c.tp, "--out", c.out, "--device", "cpu",
                                                "--base", "./no/such/folder"],
                                     "is not a local folder ('./no/such/folder' does not exist) and not a hub id"),
    "a plan larger than the disk": (lambda c: ["run", "--protocol", c.tp, "--out", c.out, "--device", "cpu",
                                               "--set", "generation.images_per_prompt=1000000000"],
                                    "The plan makes 8,000,000,000 images of 32x32 pixels"),
}


class _Case:
    def __init__(self, tiny, tp, run, tmp):
        self.tiny, self.tp, self.run, self.tmp, self.out = tiny, tp, run, tmp, tmp / "out"

    def file(self, name, data):
        (self.tmp / name).write_bytes(data)
        return self.tmp / name

    def copy_run(self, **replace):
        d = self.tmp / "run-copy"
        shutil.copytree(self.run, d)
        for name, data in replace.items():
            (d / name).write_bytes(data)
        return d


@pytest.mark.parametrize("case", list(CORPUS))
def test_malformed_input_exits_2_with_a_message_and_writes_nothing(case, tiny, tiny_protocol, base_run, tmp_path):
    make_args, fragment = CORPUS[case]
    c = _Case(tiny, tiny_protocol, base_run, tmp_path)
    before = (c.run / "results.json").read_bytes()
    r = cli(*make_args(c))
    expect_user_error(r, fragment)
    assert "Internal error" not in r.output
    assert not (c.out / "results.json").exists() and not list(c.out.glob("images/*.png"))
    assert (c.run / "results.json").read_bytes() == before


@pytest.mark.parametrize("case", ["clip config", "lora shapes", "textual-inversion size"])
def test_misfits_are_found_before_the_first_image(case, tiny, tmp_path, protocol_copy):
    from safetensors.torch import load_file

    args, expected = [], []
    if case == "clip config":
        p = protocol_copy()
        missing = str(tiny / "clip" / "missing_config.json")
        p.write_text(p.read_text().replace(str(tiny / "clip" / "open_clip_config.json"), missing))
        r = cli("protocols", "validate", p)
        expect_user_error(r, f"field 'encoders.clip.arch' names '{missing}', which does not exist")
        args = ["--protocol", p]
        expected = ["open_clip model config", "missing_config.json' does not exist"]
    elif case == "lora shapes":
        d = tmp_path / "sdxl-lora"
        d.mkdir()
        lora = load_file(str(tiny / "lora" / "pytorch_lora_weights.safetensors"))
        assert all(".lora.down." in k or ".lora.up." in k for k in lora)  # a LoRA for a base twice as wide
        wider = {k: torch.zeros(v.shape[0] * (2 if ".up." in k else 1), v.shape[1] * (2 if ".down." in k else 1))
                 for k, v in lora.items()}
        save_file(wider, str(d / "pytorch_lora_weights.safetensors"))
        args = ["--protocol", tiny / "tiny.yaml", "--adapter", d, "--subject", "red-block"]
        key = sorted(wider)[0]
        expected = [f"LoRA '{d / 'pytorch_lora_weights.safetensors'}' does not fit the base model: its tensor "
                    f"'{key}' has shape {list(wider[key].shape)}", "The shapes do not match the base",
                    "trained for another base model"]
    else:
        d = tmp_path / "ti"
        d.mkdir()
        save_file({"sks": torch.zeros(1, 64)}, str(d / "learned_embeds.safetensors"))
        args = ["--protocol", tiny / "tiny.yaml", "--adapter", d, "--subject", "red-block"]
        expected = ["embedding 'sks' has size 64, but the base model's text encoder uses embeddings of size 32"]
    r = cli("run", *args, "--out", tmp_path / "o", "--device", "cpu")
    expect_user_error(r, *expected)
    assert "{" not in r.output.split("Error:")[1]  # no unfilled placeholder
    assert not list((tmp_path / "o").glob("images/*.png"))
