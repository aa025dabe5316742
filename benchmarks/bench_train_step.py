"""One training step of CAT against LoRA and against a straightforward two-UNet, three-pass CAT.

The product's CAT (``kps_bench.train.cat.cat_loss``) keeps one UNet: the base prediction comes from
the same UNet with the adapter disabled under ``torch.no_grad()``, and the two adapter predictions
are one batched pass. The reference below (kept here only, never in the product) does what the
official code (OnomaAi101/CAT) does: a second, frozen copy of the UNet for the base prediction and
three separate forward passes. All three variants see the same batch, LoRA, optimiser and seed.

Step time (pytest-benchmark)::

    pytest benchmarks/bench_train_step.py --benchmark-enable

Step time and peak memory as a table (each variant in a fresh process; peak memory is the growth of
the process's peak resident set over a process that only imported the libraries, so it counts
weights, optimiser state, activations and gradients)::

    python benchmarks/bench_train_step.py [--batch 4] [--steps 20]

The UNet is the shapes world's (``kps_bench.world.train.unet_config``; 8x8 latents); the issue's
targets: CAT <= 2.4x the LoRA step time and <= 1.3x its peak memory, and below the two-UNet version.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time

import pytest

VARIANTS = ("lora", "cat", "cat_two_unet")
RANK = 1  # baselines/cat.yaml
TEXT_LEN, HIDDEN = 24, 64  # the shapes world's text encoder


def unet_config() -> dict:
    try:
        from kps_bench.world.train import unet_config as world_unet

        return world_unet()
    except ImportError:  # the world is its own issue; same shape as its UNet
        return dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 96), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=HIDDEN,
                    attention_head_dim=32, norm_num_groups=32)


def two_unet_cat_loss(unet, base_unet, batch, target, emb_trigger, emb_free, cat_weight):
    """The reference: a frozen second UNet for eps_theta and three separate forward passes."""
    import torch
    import torch.nn.functional as F

    pred_trigger = unet(batch.noisy, batch.timesteps, emb_trigger).sample
    pred_free = unet(batch.noisy, batch.timesteps, emb_free).sample
    with torch.no_grad():
        base = base_unet(batch.noisy, batch.timesteps, emb_free).sample
    denoise = F.mse_loss(pred_trigger.float(), target.float())
    preserve = F.mse_loss(pred_free.float(), base.float())
    return denoise + cat_weight * preserve, denoise, preserve


def make_step(variant: str, batch_size: int = 4, seed: int = 0):
    """A closure running one full optimiser step of ``variant`` on a fixed batch."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from kps_bench.train.cat import cat_loss
    from kps_bench.train.core import Batch, lora_target_modules
    from kps_bench.train.lora import mse

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    unet.requires_grad_(False)
    base_unet = copy.deepcopy(unet) if variant == "cat_two_unet" else None  # "loads the UNet twice"
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=lora_target_modules()))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    z0 = torch.randn(batch_size, 4, size, size, generator=g)
    eps = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    batch = Batch(z0, eps, t, z0 * 0.8 + eps * 0.6, [0] * batch_size, [0] * batch_size)
    emb_t = torch.randn(batch_size, TEXT_LEN, HIDDEN, generator=g)
    emb_y = torch.randn(batch_size, TEXT_LEN, HIDDEN, generator=g)

    def step():
        if variant == "lora":
            loss = mse(unet(batch.noisy, batch.timesteps, emb_t).sample, eps)
        elif variant == "cat":
            loss = cat_loss(unet, unet, batch, eps, emb_t, emb_y, 1.0)[0]
        else:
            loss = two_unet_cat_loss(unet, base_unet, batch, eps, emb_t, emb_y, 1.0)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


# ----------------------------------------------------------------------------- pytest-benchmark


@pytest.fixture(autouse=True, scope="module")
def _threads():
    import torch

    torch.set_num_threads(int(os.environ.get("KPS_BENCH_THREADS", "1")))


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step_time(benchmark, variant):
    step = make_step(variant)
    benchmark.group = "train step (shapes-world UNet, batch 4)"
    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=3)


def test_train_step_targets():
    """Time and peak memory, each variant in a fresh process; the issue's targets."""
    rows = measure_all(batch_size=4, steps=15)
    lora, cat, two = rows["lora"], rows["cat"], rows["cat_two_unet"]
    print("\n" + table(rows))
    assert cat["step_ms"] <= 2.4 * lora["step_ms"]
    assert cat["peak_mib"] <= 1.3 * lora["peak_mib"]
    assert cat["step_ms"] < two["step_ms"] and cat["peak_mib"] < two["peak_mib"]


# ----------------------------------------------------------------------------- measurement in fresh processes


def _peak_rss_mib() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def measure(variant: str, batch_size: int, steps: int) -> dict:
    """Run in a fresh process: peak-RSS growth over the imports, and the median step time."""
    import torch

    torch.set_num_threads(int(os.environ.get("KPS_BENCH_THREADS", "1")))
    import diffusers  # noqa: F401  (imports counted in the baseline, not the step)
    import peft  # noqa: F401

    import kps_bench.train.cat  # noqa: F401

    baseline = _peak_rss_mib()
    step = make_step(variant, batch_size)
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "step_ms": 1000 * statistics.median(times), "peak_mib": _peak_rss_mib() - baseline}


def measure_all(batch_size: int = 4, steps: int = 20) -> dict:
    rows = {}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--measure", v, "--batch", str(batch_size), "--steps",
                              str(steps)], capture_output=True, text=True, check=True)
        rows[v] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def table(rows: dict) -> str:
    lora = rows["lora"]
    lines = ["| variant | step time (ms, median) | x LoRA | peak memory (MiB) | x LoRA |", "|---|---:|---:|---:|---:|"]
    for v, r in rows.items():
        lines.append(f"| {v} | {r['step_ms']:.1f} | {r['step_ms'] / lora['step_ms']:.2f} | {r['peak_mib']:.1f} | "
                     f"{r['peak_mib'] / lora['peak_mib']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--measure", choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch, args.steps)))
    else:
        print(table(measure_all(args.batch, args.steps)))
