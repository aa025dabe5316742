"""Trainers (issue 4) on the tiny random pipeline: losses, equivalences, formats, resume and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from kps_bench.errors import UserError
from kps_bench.generate import Plan
from kps_bench.models import LORA_FILE, TI_FILE
from kps_bench.protocol import class_image_seed, load_protocol
from kps_bench.train import TrainingInterrupted, load_recipe, train
from kps_bench.train.checkpoint import WEIGHTS_FILE
from kps_bench.train.output import LOG_FILE, TRAINING_JSON, logged_rows, partial_dir

FAST = ["steps=4", "resolution=32", "checkpoint_every=2", "gradient_checkpointing=false"]


@pytest.fixture(scope="module")
def protocol(tiny_protocol):
    return load_protocol(str(tiny_protocol))


def _weights(out: Path) -> dict:
    return load_file(str(out / LORA_FILE))


def _tiny_unet_with_lora(tiny_protocol, seed=0):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_protocol.parent / "pipeline" / "unet")
    base = copy.deepcopy(unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet, base


def _batch(seed=0, n=2):
    from kps_bench.train.data import Batch

    g = torch.Generator().manual_seed(seed)
    z0, eps = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    z_t = z0 * 0.7 + eps * 0.7
    return Batch(z0, eps, t, z_t, [0] * n, [0] * n), torch.randn(n, 77, 32, generator=g), torch.randn(n, 77, 32, generator=g)


# ----------------------------------------------------------------------------- recipes


def test_recipe_merge_order_and_hash(tmp_path, tiny_protocol):
    raw = yaml.safe_load(tiny_protocol.read_text())
    raw["training"] = {"defaults": {"steps": 7, "resolution": 32, "captions": ["a {subject}"]},
                       "cat": {"learning_rate": 3e-3, "cat_weight": 0.5}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    prot = load_protocol(str(path))
    r, sources = load_recipe("cat", prot, ["cat_weight=0.25"])
    assert (r.rank, r.steps, r.resolution, r.learning_rate, r.cat_weight) == (1, 7, 32, 3e-3, 0.25)
    assert [Path(s).name for s in sources[:2]] == ["lora.yaml", "cat.yaml"] and sources[-1] == "--set"
    lora, _ = load_recipe("lora", prot)
    assert (lora.steps, lora.learning_rate) == (7, 1e-4) and "cat_weight" not in lora.to_dict()
    assert load_recipe("cat", prot, ["cat_weight=0.25"])[0].sha256 == r.sha256 != load_recipe("cat", prot)[0].sha256


@pytest.mark.parametrize("sets, message", [
    (["rnk=4"], "unknown field 'rnk'"),
    (["cat_weight=1"], "only used by cat"),
    (["steps=zero"], "field 'steps' must be an integer"),
    (["lr_scheduler=wavy"], "field 'lr_scheduler' must be one of"),
    (["resolution=30"], "field 'resolution' must be a multiple of 8"),
    (["caption_dropout=1"], "field 'caption_dropout' must be a probability in"),
])
def test_recipe_errors_name_the_field(sets, message):
    with pytest.raises(UserError, match=message):
        load_recipe("lora", None, sets)


def test_processes_share_the_recipes_global_batch():
    """N processes each get an equal share of batch_size x gradient_accumulation_steps: the micro-batch is split when N
    divides it, else the accumulation steps; a recipe that N divides neither way is refused, naming both fields."""
    from kps_bench.train.recipe import split_batch

    for (b, a), n, share in [((4, 1), 1, (4, 1)), ((4, 3), 2, (2, 3)), ((1, 4), 2, (1, 2)), ((6, 4), 4, (6, 1)),
                             ((2, 2), 2, (1, 2))]:
        recipe = load_recipe("lora", None, [f"batch_size={b}", f"gradient_accumulation_steps={a}"])[0]
        assert split_batch(recipe, n) == share and share[0] * share[1] * n == recipe.global_batch_size == b * a
    recipe = load_recipe("lora", None, ["batch_size=3", "gradient_accumulation_steps=3"])[0]
    with pytest.raises(UserError, match=r"the global batch of batch_size 3 x gradient_accumulation_steps 3 cannot be "
                                        r"shared by 2 processes: field 'batch_size' or 'gradient_accumulation_steps' "
                                        r"must be a multiple of 2 \(e.g. --set batch_size=6"):
        split_batch(recipe, 2)


def test_baselines_cover_every_field():
    from kps_bench.train.recipe import METHODS, allowed_fields, recipe_file_layers

    for m in METHODS:
        merged = {k: v for _, layer in recipe_file_layers(m) for k, v in layer.items()}
        assert set(allowed_fields(m)) - {"method"} <= set(merged), m


# ----------------------------------------------------------------------------- the CAT loss


def test_cat_loss_equals_hand_computation(tiny_protocol):
    from kps_bench.train.cat import cat_loss

    unet, base = _tiny_unet_with_lora(tiny_protocol)
    batch, emb_t, emb_y = _batch()
    lam = 0.7
    total, denoise, preserve = cat_loss(unet, unet, batch, batch.noise, emb_t, emb_y, lam)
    grads = torch.autograd.grad(total, [p for p in unet.parameters() if p.requires_grad])

    with torch.no_grad():
        eps_base = base(batch.noisy, batch.timesteps, emb_y).sample  # theta alone, a separate model
    pred_t = unet(batch.noisy, batch.timesteps, emb_t).sample  # three separate passes, as in the paper
    pred_y = unet(batch.noisy, batch.timesteps, emb_y).sample
    hand_d = ((batch.noise - pred_t) ** 2).mean()
    hand_p = ((pred_y - eps_base) ** 2).mean()
    hand = hand_d + lam * hand_p
    hand_grads = torch.autograd.grad(hand, [p for p in unet.parameters() if p.requires_grad])
    torch.testing.assert_close(denoise, hand_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(preserve, hand_p, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, hand, rtol=1e-5, atol=1e-6)
    assert preserve > 0
    for g, h in zip(grads, hand_grads):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def test_disabled_adapter_reproduces_the_base_exactly(tiny_protocol):
    from kps_bench.train.cat import adapter_disabled

    unet, base = _tiny_unet_with_lora(tiny_protocol)
    batch, emb, _ = _batch(1)
    with torch.no_grad():
        expected = base(batch.noisy, batch.timesteps, emb).sample
        with adapter_disabled(unet):
            got = unet(batch.noisy, batch.timesteps, emb).sample
        adapted = unet(batch.noisy, batch.timesteps, emb).sample
    assert torch.equal(got, expected)
    assert not torch.allclose(adapted, expected)  # re-enabled afterwards
    lora = [p for n, p in unet.named_parameters() if "lora" in n]
    assert lora and all(p.requires_grad for p in lora)


def test_cat_with_zero_weight_trains_exactly_lora(tmp_path, protocol):
    a = train("lora", protocol, "red-block", tmp_path / "lora", "cpu", FAST + ["learning_rate=1e-2"]).out
    b = train("cat", protocol, "red-block", tmp_path / "cat0", "cpu", FAST + ["learning_rate=1e-2", "cat_weight=0"]).out
    c = train("cat", protocol, "red-block", tmp_path / "cat1", "cpu", FAST + ["learning_rate=1e-2"]).out
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # lambda = 1 trains something else
    log = (c / LOG_FILE).read_text().splitlines()
    assert log[0].startswith("step,loss,loss_denoise,loss_preserve,lr") and len(log) == 5
    t = json.loads((c / TRAINING_JSON).read_text())
    assert t["method"] == "cat" and t["subject"] == "red-block" and t["recipe"]["cat_weight"] == 1.0
    assert t["protocol_sha256"] == protocol.sha256 and len(t["recipe_sha256"]) == 64
    assert t["allow_prompt_overlap"] is False and t["captions"] == ["a sks block"]
    assert t["seed"] == t["recipe"]["seed"] and "loss_preserve" in t["final_loss"]["last_step"]
    assert t["num_processes"] == 1 and t["global_batch_size"] == t["recipe"]["batch_size"] == 1
    assert t["per_process"] == {"batch_size": 1, "gradient_accumulation_steps": 1}
    assert isinstance(t["duration_s"], float) and 0 <= t["duration_s"] < 600 and t["start_time"] <= t["end_time"]
    assert not partial_dir(c).exists()


# ----------------------------------------------------------------------------- formats


def test_saved_lora_loads_with_plain_diffusers_and_changes_the_output(tmp_path, tiny_protocol, protocol):
    from diffusers import StableDiffusionPipeline

    out = train("lora", protocol, "red-block", tmp_path / "lora", "cpu", FAST + ["learning_rate=5e-2"]).out
    pipe = StableDiffusionPipeline.from_pretrained(tiny_protocol.parent / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a photo of a sks block", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    pipe.load_lora_weights(str(out))
    assert pipe.get_active_adapters()
    after = image()
    assert abs(after - before).max() > 1e-4


def test_sorting_safetensors_metadata_keeps_tensors_and_length(tmp_path):
    import struct

    from safetensors import safe_open
    from safetensors.torch import save_file

    from kps_bench.models import sort_safetensors_metadata

    p = tmp_path / "x.safetensors"
    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(5, dtype=torch.float16)}
    save_file(tensors, str(p), metadata={"zeta": "1", "alpha": "é", "mid": "x"})
    size = p.stat().st_size
    sort_safetensors_metadata(p)
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert list(json.loads(raw[8:8 + n])["__metadata__"]) == ["alpha", "mid", "zeta"] and p.stat().st_size == size
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"zeta": "1", "alpha": "é", "mid": "x"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_the_same_lora_gives_the_same_file_bytes_in_every_process(tmp_path, tiny_protocol):
    """Two processes with different string-hash seeds write byte-identical adapter files (content hashes
    and the run cache keys built on them must not depend on the process)."""
    import hashlib
    import os
    import subprocess
    import sys

    digests = set()
    for seed in ("1", "2"):
        out = tmp_path / f"lora-{seed}"
        cmd = [sys.executable, "-m", "kps_bench", "train-baseline", "lora", "--protocol", str(tiny_protocol), "--subject",
               "blue-ball", "--out", str(out), "--device", "cpu", *[a for s in FAST for a in ("--set", s)]]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
        digests.add(hashlib.sha256((out / LORA_FILE).read_bytes()).hexdigest())
    assert len(digests) == 1


def test_textual_inversion_leaves_other_rows_untouched(tmp_path, tiny_protocol, protocol):
    from transformers import CLIPTextModel, CLIPTokenizer

    out = tmp_path / "ti"
    with pytest.raises(TrainingInterrupted):
        train("textual-inversion", protocol, "red-block", out, "cpu", FAST + ["learning_rate=1e-1"], stop_after=2)
    ckpt = next(partial_dir(out).glob(f"checkpoints/step-*/{WEIGHTS_FILE}"))
    emb = load_file(str(ckpt))["text_encoder.token_embedding"]
    base = CLIPTextModel.from_pretrained(tiny_protocol.parent / "pipeline" / "text_encoder").get_input_embeddings().weight
    tok = CLIPTokenizer.from_pretrained(tiny_protocol.parent / "pipeline" / "tokenizer")
    assert emb.shape[0] == base.shape[0] + 1
    assert torch.equal(emb[: base.shape[0]], base.detach())  # every other row bit-identical, despite weight decay
    init = base[tok.encode("block", add_special_tokens=False)].mean(0)
    assert not torch.allclose(emb[-1], init)  # the new row trained
    train("textual-inversion", protocol, "red-block", out, "cpu", FAST + ["learning_rate=1e-1"], resume=True)
    learned = load_file(str(out / TI_FILE))
    assert list(learned) == ["sks"] and learned["sks"].shape == (1, 32) and learned["sks"].dtype == torch.float32


def test_dreambooth_writes_a_pipeline_and_reuses_class_images(tmp_path, protocol, monkeypatch):
    from kps_bench.models import resolve_adapter

    monkeypatch.setenv("KPS_BENCH_CACHE", str(tmp_path / "cache"))
    sets = FAST + ["num_class_images=3", "class_sample_steps=2"]
    a = train("dreambooth", protocol, "red-block", tmp_path / "db1", "cpu", sets)
    b = train("dreambooth", protocol, "red-block", tmp_path / "db2", "cpu", sets)
    assert a.training["class_images"]["generated_now"] == 3 and b.training["class_images"]["generated_now"] == 0
    # the class prompt alone, never an evaluation prompt, with seeds that no evaluation image has
    assert a.training["class_images"]["prompt"] == "a block" and a.training["recipe"]["class_prompt"] == "a {class_noun}"
    assert a.training["class_images"]["seeds"] == [class_image_seed(a.training["seed"], k) for k in range(3)]
    evaluation = {j.seed for j in Plan(protocol, list(protocol.subjects), {"spec": "x"}, None, "cpu").jobs()}
    assert len(evaluation) == 4 and not evaluation & set(a.training["class_images"]["seeds"])
    assert "loss_prior" in a.training["final_loss"]["last_step"]
    info = resolve_adapter(str(a.out), "auto", False)
    assert info.kind == "pipeline" and info.training["method"] == "dreambooth"


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_caption_dropout_draws_the_empty_prompt(tmp_path, protocol, p):
    from kps_bench.train.trainer import make_trainer

    trainer = make_trainer("lora", protocol, "red-block", tmp_path / "t", "cpu", FAST + [f"caption_dropout={p}"])
    trainer.setup()
    caps, n = trainer.data.captions, len(trainer.data.captions.templates)
    idx = [i for _ in range(200) for i in trainer.data.sample(4).caption_index]
    if p == 0:
        assert len(caps.with_trigger) == n and max(idx) < n
    else:
        assert caps.with_trigger[n] == caps.without_trigger[n] == "" and len(caps.with_trigger) == n + 1
        assert abs(idx.count(n) / len(idx) - p) < 0.05  # 800 draws: 4 standard deviations


@pytest.mark.parametrize("method", ["cat", "dreambooth", "textual-inversion"])
def test_every_method_trains_with_caption_dropout(tmp_path, protocol, monkeypatch, method):
    monkeypatch.setenv("KPS_BENCH_CACHE", str(tmp_path / "cache"))
    sets = FAST + ["caption_dropout=0.5", "learning_rate=1e-2"]
    if method == "dreambooth":
        sets += ["num_class_images=3", "class_sample_steps=2"]
    res = train(method, protocol, "red-block", tmp_path / method, "cpu", sets)
    assert res.training["recipe"]["caption_dropout"] == 0.5 and "" in res.training["captions"]


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, protocol):
    sets = FAST + ["learning_rate=1e-2", "steps=5"]
    full = train("cat", protocol, "red-block", tmp_path / "full", "cpu", sets).out
    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        train("cat", protocol, "red-block", out, "cpu", sets, stop_after=2)
    assert not out.exists() and partial_dir(out).is_dir()
    with pytest.raises(UserError, match="--resume"):
        train("cat", protocol, "red-block", out, "cpu", sets)
    with pytest.raises(UserError, match="different recipe"):
        train("cat", protocol, "red-block", out, "cpu", sets[:-1] + ["steps=6"], resume=True)
    res = train("cat", protocol, "red-block", out, "cpu", sets, resume=True)
    assert res.training["resumed_from_step"] == 2
    # the loss statistics cover every step, not only those after the resume
    assert res.training["final_loss"] == json.loads((full / TRAINING_JSON).read_text())["final_loss"]
    wf, wr = _weights(full), _weights(out)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    strip = lambda p: [",".join(line.split(",")[:-1]) for line in (p / LOG_FILE).read_text().splitlines()]  # noqa: E731
    assert strip(full) == strip(out)  # every loss term of every step, except the wall-clock column


@pytest.mark.parametrize("cut", ["1", "12,0.5", "12,0.5,0.001,\r", "7,0.7\r\n"])
def test_a_resume_keeps_only_the_complete_log_rows_up_to_its_checkpoint(tmp_path, cut):
    """A row cut short by a full disk (step 12 cut to "1", or missing fields) is dropped, not kept as a step."""
    log = tmp_path / LOG_FILE
    rows = "step,loss,lr,grad_norm\r\n" + "".join(f"{i},0.{i},0.001,1.{i}\r\n" for i in range(1, 12))
    with open(log, "w", encoding="utf-8", newline="") as f:  # as csv.DictWriter writes it, then the cut row
        f.write(rows + cut)
    kept = logged_rows(log, 10)
    assert [r["step"] for r in kept] == [str(i) for i in range(1, 11)]
    assert kept[-1] == {"step": "10", "loss": "0.10", "lr": "0.001", "grad_norm": "1.10"}


@pytest.mark.parametrize("method, kind", [("cat", "lora"), ("textual-inversion", "textual-inversion"),
                                          ("dreambooth", "pipeline")])
def test_trained_adapters_evaluate_with_kps_bench_run(tmp_path, protocol, monkeypatch, method, kind):
    from kps_bench.run import RunOptions, run_benchmark

    monkeypatch.setenv("KPS_BENCH_CACHE", str(tmp_path / "cache"))
    out = train(method, protocol, "blue-ball", tmp_path / "a", "cpu",
                FAST + (["num_class_images=2", "class_sample_steps=2"] if method == "dreambooth" else [])).out
    results = run_benchmark(protocol, RunOptions(out=tmp_path / "run", adapter=str(out), device="cpu"))
    assert results["provenance"]["method"] == method
    assert results["provenance"]["subjects"] == ["blue-ball"]
    assert results["provenance"]["adapter"]["kind"] == kind
    assert results["counts"]["adapter"] > 0


# ----------------------------------------------------------------------------- bad input


def _cli():
    from kps_bench.cli import main
    from kps_bench.train.cli import train_baseline

    if "train-baseline" not in main.commands:
        main.add_command(train_baseline)
    return main


@pytest.mark.parametrize("args, message", [
    (["sculpt", "--subject", "red-block"], "'sculpt' is not one of 'cat', 'lora'"),
    (["lora", "--subject", "green-cone"], "Unknown subject 'green-cone'"),
    (["lora", "--subject", "red-block", "--set", "rank=zero"], "field 'rank' must be an integer"),
    (["lora", "--subject", "red-block", "--seed", "-1"], "Invalid value for '--seed': -1 is not in the range x>=0"),
    (["lora", "--subject", "red-block", "--seed", "five"], "Invalid value for '--seed': 'five' is not a valid integer"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_protocol, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(_cli(), ["train-baseline", *args, "--protocol", str(tiny_protocol), "--out", str(out),
                                         "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists() and not partial_dir(out).exists()


def test_cli_trains_and_reports(tmp_path, tiny_protocol):
    out = tmp_path / "out"
    sets = [a for s in FAST for a in ("--set", s)]
    result = CliRunner().invoke(_cli(), ["train-baseline", "lora", "--protocol", str(tiny_protocol), "--subject", "blue-ball",
                                         "--out", str(out), "--device", "cpu", *sets])
    assert result.exit_code == 0, result.output
    assert (out / LORA_FILE).is_file() and json.loads((out / TRAINING_JSON).read_text())["subject"] == "blue-ball"
    again = CliRunner().invoke(_cli(), ["train-baseline", "lora", "--protocol", str(tiny_protocol), "--subject", "blue-ball",
                                        "--out", str(out), "--device", "cpu"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_seed_overrides_the_recipe_and_names_the_default_folder(tmp_path, tiny_protocol, monkeypatch):
    """--seed N beats the recipe and --set, is recorded, and the default --out of each seed differs."""
    monkeypatch.chdir(tmp_path)
    args = ["train-baseline", "lora", "--protocol", str(tiny_protocol), "--subject", "red-block", "--device", "cpu",
            *[a for s in FAST for a in ("--set", s)]]
    r = CliRunner().invoke(_cli(), args + ["--seed", "5", "--set", "seed=3"])
    assert r.exit_code == 0, r.output
    seeded = tmp_path / "adapters" / "tiny" / "lora" / "red-block-seed5"
    t = json.loads((seeded / TRAINING_JSON).read_text())
    assert t["seed"] == t["recipe"]["seed"] == 5 and t["recipe_sources"][-2:] == ["--set", "--seed"]
    assert "seed 5;" in r.output and f"--adapter {Path('adapters/tiny/lora/red-block-seed5')} --out runs/lora-red-block-seed5" in r.output
    r = CliRunner().invoke(_cli(), args)
    assert r.exit_code == 0, r.output
    default = tmp_path / "adapters" / "tiny" / "lora" / "red-block"
    t = json.loads((default / TRAINING_JSON).read_text())
    assert t["seed"] == t["recipe"]["seed"] == 42 and t["recipe_sources"][-1] == "--set"  # baselines/lora.yaml's seed
    ws, wd = _weights(seeded), _weights(default)
    assert any(not torch.equal(ws[k], wd[k]) for k in ws)


def test_missing_references(tmp_path, tiny_protocol):
    prot = load_protocol(str(tiny_protocol), ["subjects.0.references=nowhere"])
    with pytest.raises(UserError, match="does not exist"):
        train("lora", prot, "red-block", tmp_path / "o", "cpu", FAST)
    assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()


def test_textual_inversion_rejects_an_existing_token(tmp_path, tiny_protocol):
    prot = load_protocol(str(tiny_protocol), ["subjects.0.trigger=a"])  # 'a' is a token of the CLIP vocabulary
    with pytest.raises(UserError, match="already exists in the base model's tokenizer"):
        train("textual-inversion", prot, "red-block", tmp_path / "o", "cpu", FAST)
    assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()


def test_out_of_memory_names_the_knob_and_leaves_nothing(tmp_path, protocol, monkeypatch):
    import kps_bench.train.lora as lora

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lora, "mse", oom)
    with pytest.raises(UserError, match="batch_size=N"):
        train("lora", protocol, "red-block", tmp_path / "o", "cpu", FAST)
    assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()


# ----------------------------------------------------------------------------- divergence (issue 17)


def test_a_diverging_training_stops_with_exit_2_and_leaves_no_adapter(tmp_path, tiny_protocol):
    out = tmp_path / "out"
    sets = [a for s in FAST + ["learning_rate=1e30"] for a in ("--set", s)]
    r = CliRunner().invoke(_cli(), ["train-baseline", "lora", "--protocol", str(tiny_protocol), "--subject",
                                    "red-block", "--out", str(out), "--device", "cpu", *sets])
    assert r.exit_code == 2, r.output
    assert "Error: Training diverged at step 2 of 4: the loss or gradient is not finite (loss nan" in r.output
    assert "with learning_rate 1e+30. Lower learning_rate (e.g. --set learning_rate=1e+29)" in r.output
    assert "No checkpoint was reached, so nothing is kept." in r.output
    assert not out.exists() and not partial_dir(out).exists()
    r = CliRunner().invoke(_cli(), ["train-baseline", "lora", "--protocol", str(tiny_protocol), "--subject",
                                    "red-block", "--out", str(out), "--set", "learning_rate=.inf"])
    assert r.exit_code == 2 and "field 'learning_rate' must be a finite number, got inf" in r.output


def test_divergence_keeps_the_last_good_checkpoint_for_a_resume_with_a_new_recipe(tmp_path, protocol, monkeypatch):
    import kps_bench.train.lora as lora

    real, calls = lora.mse, []

    def nan_from_step_3(*args, **kwargs):  # the loss blows up after the checkpoint of step 2
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(lora, "mse", nan_from_step_3)
    out = tmp_path / "o"
    with pytest.raises(UserError, match=r"Training diverged at step 3 of 4: .*The last good checkpoint \(step 2\) "
                                        r"is kept in .*continue from it with --resume and the new --set"):
        train("lora", protocol, "red-block", out, "cpu", FAST + ["learning_rate=1e-2"])
    assert not out.exists() and (partial_dir(out) / "diverged.json").is_file()
    assert next(partial_dir(out).glob(f"checkpoints/step-00000002/{WEIGHTS_FILE}"))
    monkeypatch.setattr(lora, "mse", real)
    res = train("lora", protocol, "red-block", out, "cpu", FAST + ["learning_rate=1e-3"], resume=True)
    assert res.training["resumed_from_step"] == 2 and res.training["recipe"]["learning_rate"] == 1e-3
    assert res.training["recipe_changed_on_resume"]["at_step"] == 2
    assert (out / LORA_FILE).is_file() and not partial_dir(out).exists()
    assert [int(line.split(",")[0]) for line in (out / LOG_FILE).read_text().splitlines()[1:]] == [1, 2, 3, 4]
