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


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_args(tiny_protocol, out, *extra):
    return ["run", "--protocol", tiny_protocol, "--out", out, "--device", "cpu", *extra]


def expect_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in result.output, result.output


def protocol_copy(tiny, tmp_path, **changes):
    d = yaml.safe_load((tiny / "tiny.yaml").read_text())
    for k, v in changes.items():
        d[k] = v
    for key in ("base_model",):
        d[key] = str(tiny / d[key])
    d["encoders"]["clip"] = {k: str(tiny / v) for k, v in d["encoders"]["clip"].items()}
    d["encoders"]["dino"]["model"] = str(tiny / d["encoders"]["dino"]["model"])
    for s in d["subjects"]:
        if not s["references"].startswith("/"):
            s["references"] = str(tiny / s["references"])
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_missing_protocol(tmp_path):
    expect_user_error(cli("run", "--protocol", tmp_path / "nope.yaml"), "does not exist")


def test_unknown_field_named_with_file(tiny, tmp_path):
    p = protocol_copy(tiny, tmp_path, colour="red")
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


def test_textual_inversion_token_already_in_tokenizer(tiny, tmp_path):
    p = protocol_copy(tiny, tmp_path)
    r = cli(*run_args(p, tmp_path / "o"), "--adapter", tiny / "textual-inversion", "--subject", "red-block",
            "--set", "subjects.0.trigger=in")  # "in" is a CLIP token
    expect_user_error(r, "'in' already exists in the base model's tokenizer")


@pytest.mark.parametrize("case", ["missing", "empty", "not-images", "corrupt"])
def test_bad_reference_folders(tiny, tmp_path, case):
    refs = tmp_path / "refs"
    if case != "missing":
        refs.mkdir()
    if case == "not-images":
        (refs / "notes.txt").write_text("hello")
    if case == "corrupt":
        (refs / "a.png").write_bytes(b"not a png")
    subjects = yaml.safe_load((tiny / "tiny.yaml").read_text())["subjects"]
    subjects[0]["references"] = str(refs)
    p = protocol_copy(tiny, tmp_path, subjects=subjects)
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


def test_verbose_shows_traceback_and_internal_errors_exit_1(tmp_path):
    r = CliRunner().invoke(main, ["--verbose", "run", "--protocol", str(tmp_path / "nope.yaml")])
    assert r.exit_code != 0 and isinstance(r.exception, UserError)


def test_help_explains_options():
    r = cli("run", "--help")
    assert r.exit_code == 0
    for opt in ("--protocol", "--adapter", "--adapter-kind", "--subject", "--out", "--device", "--dtype",
                "--batch-size", "--set", "--allow-unsafe-pickle"):
        assert opt in r.output
