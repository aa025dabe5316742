"""The training run shared by the four methods: setup -> build -> loop -> save, on accelerate.

:func:`run` is the whole of it. :meth:`Trainer.setup` makes the accelerator, loads the frozen base pipeline and the
training data (:mod:`~kps_bench.train.data`); the method's ``build`` adds what it trains and returns a
:class:`Training` (parameters, modules, loss); :meth:`Trainer.fit` is the loop of diffusers' training examples
(AdamW, ``get_scheduler``, ``accelerator.accumulate``, gradient clipping, ``save_state`` checkpoints and
``load_state`` on ``--resume``); the method's ``save`` writes the adapter and :func:`~kps_bench.train.output.finish`
writes training.json and renames ``OUT.partial`` to ``OUT``.

Several processes (``accelerate launch``, ``torchrun``) share the recipe's global batch (``batch_size *
gradient_accumulation_steps`` images per optimizer step; :func:`~kps_bench.train.recipe.split_batch`), so a recipe
trains the same way on any number of processes; each process draws its share from its own generator.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

from ..errors import UserError
from ..protocol import Protocol, Subject
from .checkpoint import Checkpoints
from .data import Draws, LatentCache, build_captions, encode_latents, load_reference_pixels
from .output import LOG_FILE, LossLog, TrainResult, finish, partial_dir, work_folder
from .recipe import METHODS, Recipe, load_recipe, split_batch


@dataclass
class Training:
    """What a method's ``build`` returns for the loop."""

    params: dict  # name -> float32 tensor: what AdamW updates and the checkpoints hold
    model: object  # the module, or list of modules, that accelerate prepares
    loss: Callable  # loss(prepared model (or list), batch) -> (loss tensor, {term: float}) for one micro-batch
    after_step: Callable | None = None  # called after every optimizer step


class TrainingInterrupted(Exception):
    """Raised by ``stop_after`` (tests) to simulate an interruption right after a checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step


def run(trainer: Trainer, method: ModuleType) -> TrainResult:
    """Train with ``method``, the module of one method: ``build(trainer) -> Training`` and ``save(trainer, training)
    -> [files written in trainer.work]``."""
    trainer.setup()
    with work_folder(trainer):
        training = method.build(trainer)
        trainer.fit(training)
        files = method.save(trainer, training)
        return finish(trainer, files + [LOG_FILE])


@dataclass
class Trainer:
    """Shared state of one run and the steps every method takes: :meth:`setup`, :meth:`fit`."""

    method: str
    protocol: Protocol
    subject: Subject
    recipe: Recipe
    recipe_sources: list[str]
    out: Path
    work: Path
    device_arg: str = "auto"
    resume: bool = False
    stop_after: int | None = None  # tests: stop (as if interrupted) after this many steps, right after a checkpoint
    # filled by setup()
    accelerator: object = None
    pipe: object = None
    base_identity: dict = field(default_factory=dict)
    data: Draws | None = None
    batch_size: int = 0  # this process's micro-batch
    weight_dtype: object = None
    t0: float = 0.0
    start_time: str = ""
    final_losses: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def device(self):
        return self.accelerator.device

    # ---- setup

    def setup(self) -> None:
        """Accelerator, base pipeline (frozen), noise scheduler, captions, cached latents, seeded generator."""
        import torch
        from accelerate import Accelerator, DataLoaderConfiguration
        from diffusers import DDPMScheduler

        from ..models import load_pipeline, resolve_device
        from ..provenance import now_iso
        from ..run import reference_images

        self.t0, self.start_time = time.perf_counter(), now_iso()
        r = self.recipe
        device = resolve_device(self.device_arg)
        precision = r.precision
        if device == "cpu" and precision == "fp16":
            precision = "no"  # CPU autocast has no float16; record what actually ran
        if device.startswith("cuda:"):
            torch.cuda.set_device(int(device.split(":")[1]))
        # split_batches: the processes share one batch, so the prepared lr scheduler steps once per optimizer step
        acc = self.accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu",
                                             dataloader_config=DataLoaderConfiguration(split_batches=True))
        self.batch_size, acc.gradient_accumulation_steps = split_batch(r, acc.num_processes)  # the recipe's, always
        self.extra["precision"] = precision
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        refs = reference_images(self.protocol, self.subject)
        resolved = self.protocol.resolve(self.protocol.base_model, "pipeline")
        loaded = load_pipeline(self.protocol.base_model, resolved, "cpu", "float32", self.protocol.generation.scheduler)
        self.pipe, self.base_identity = loaded.pipe, loaded.identity
        refuse_sdxl(self.protocol, type(self.pipe))  # a base that declared no class make_trainer could read
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            if getattr(self.pipe, name, None) is None:
                raise UserError(f"Base model '{self.protocol.base_model}' has no '{name}': train-baseline supports "
                                f"Stable-Diffusion-style pipelines (UNet, VAE, one CLIP text encoder).")
        for m in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            m.requires_grad_(False)
            m.eval()
        noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        captions = build_captions(self.protocol, self.subject, r)
        factor = self.vae_factor
        if r.resolution % factor:
            raise UserError(f"recipe: resolution {r.resolution} must be a multiple of the VAE's factor {factor}.")
        lat = r.resolution // factor
        margin = int(round(lat * r.crop_margin))
        latents = self.encode_latents(load_reference_pixels(refs, (lat + margin) * factor))
        self.extra["reference_images"] = [p.name for p in refs]
        self.data = Draws(r, captions, latents, noise_scheduler, self.device, self.batch_size, acc.process_index)
        torch.manual_seed(r.seed)  # adapter initialisation (peft's kaiming init) draws from the global RNG
        acc.wait_for_everyone()  # every process has checked OUT / OUT.partial before one creates it

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def encode_latents(self, pixels) -> LatentCache:
        """Latents of ``pixels`` (the recipe's resolution plus the crop margin) from the frozen VAE, computed once."""
        return encode_latents(self.pipe.vae, pixels, self.recipe.resolution // self.vae_factor, self.device)

    def encode_prompts(self, prompts: list[str], text_encoder=None):
        """Last hidden state of the text encoder (frozen unless it is passed in with gradients on)."""
        import torch

        te = text_encoder if text_encoder is not None else self.pipe.text_encoder
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        ctx = contextlib.nullcontext() if text_encoder is not None else torch.no_grad()
        with ctx:
            return te(ids)[0]

    # ---- the loop

    def fit(self, training: Training) -> None:
        """Optimise ``training.params`` with AdamW for the recipe's steps (from the last checkpoint on ``--resume``)."""
        import torch
        from diffusers.optimization import get_scheduler

        from ..ui import progress

        r, acc = self.recipe, self.accelerator
        # the recipe's learning rate is for its global batch, which does not change with the number of processes
        lr = r.learning_rate * r.batch_size * r.gradient_accumulation_steps if r.scale_lr else r.learning_rate
        self.extra["learning_rate_effective"] = lr
        trainable = list(training.params.values())
        for p in trainable:
            if p.dtype != torch.float32:
                raise RuntimeError("trainable parameters must be float32")  # programming error, not user input
        optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(r.adam_beta1, r.adam_beta2),
                                      weight_decay=r.adam_weight_decay, eps=r.adam_epsilon)
        scheduler = get_scheduler(r.lr_scheduler, optimizer, num_warmup_steps=r.lr_warmup_steps,
                                  num_training_steps=r.steps)
        several = isinstance(training.model, (list, tuple))
        models = list(training.model) if several else [training.model]
        *models, optimizer, scheduler = acc.prepare(*models, optimizer, scheduler)
        model = models if several else models[0]
        checkpoints = Checkpoints(self.work, acc, r, training.params, self.data.generator)
        if self.resume:
            self.extra.update(checkpoints.load(optimizer, scheduler))
        start = self.extra.get("resumed_from_step", 0)
        log = LossLog(self.work / LOG_FILE, start, acc.is_main_process)
        bar = (progress(f"train {self.method} · {self.subject.name}", r.steps) if acc.is_main_process
               else contextlib.nullcontext(lambda n=1: None))
        try:
            with bar as advance:
                advance(start)
                for step in range(start, r.steps):
                    terms: dict[str, float] = {}
                    for _ in range(acc.gradient_accumulation_steps):
                        with acc.accumulate(*models):  # no gradient exchange between processes until the last one
                            batch = self.data.sample()
                            with acc.autocast():
                                loss, parts = training.loss(model, batch)
                            acc.backward(loss)  # divided by the accumulation steps
                        for k, v in parts.items():
                            terms[k] = terms.get(k, 0.0) + float(v) / acc.gradient_accumulation_steps
                    terms = self.mean_over_processes(terms)
                    # the last micro-batch synchronised the gradients (acc.sync_gradients): one optimizer step
                    grad_norm = float(acc.clip_grad_norm_(trainable, r.max_grad_norm))
                    if not all(math.isfinite(v) for v in [*terms.values(), grad_norm]):
                        self.diverged(checkpoints, step + 1, terms, grad_norm, lr)
                    current_lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if training.after_step is not None:
                        training.after_step()
                    log.write({"step": step + 1, **{k: f"{v:.6g}" for k, v in terms.items()},
                               "lr": f"{current_lr:.6g}", "grad_norm": f"{grad_norm:.6g}",
                               "elapsed_s": f"{time.perf_counter() - self.t0:.2f}"})
                    advance(1)
                    done = step + 1
                    if done < r.steps and done % r.checkpoint_every == 0:
                        if not all(bool(torch.isfinite(p).all()) for p in trainable):
                            self.diverged(checkpoints, done, terms, grad_norm, lr,
                                          "the trained weights became inf or NaN")
                        checkpoints.save(done)
                    if self.stop_after is not None and done >= self.stop_after and done < r.steps:
                        raise TrainingInterrupted(done)
        except torch.OutOfMemoryError:
            raise UserError(f"GPU out of memory while training {self.method} at batch size {r.batch_size}, "
                            f"resolution {r.resolution}. Lower it with --set batch_size=N (and raise "
                            f"gradient_accumulation_steps to keep the effective batch), --set gradient_checkpointing=true, "
                            f"or --set precision=fp16.") from None
        finally:
            log.close()
        self.final_losses = log.final_losses()

    def mean_over_processes(self, terms: dict[str, float]) -> dict[str, float]:
        """Every loss term averaged over the processes (each saw its share of the batch); exact on one process."""
        import torch

        values = torch.tensor(list(terms.values()), dtype=torch.float64, device=self.device)
        return dict(zip(terms, self.accelerator.reduce(values, "mean").tolist()))

    def diverged(self, checkpoints: Checkpoints, step: int, losses: dict, grad_norm: float, lr: float,
                 what: str = "") -> None:
        """Stop a training whose loss, gradient or weights are no longer finite, keeping the last good checkpoint."""
        good = checkpoints.mark_diverged(step)
        loss = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        kept = (f"The last good checkpoint (step {good}) is kept in '{self.work}': continue from it with --resume and "
                f"the new --set." if good is not None else "No checkpoint was reached, so nothing is kept.")
        what = what or "the loss or gradient is not finite"
        raise UserError(f"Training diverged at step {step} of {self.recipe.steps}: {what} ({loss}; gradient norm "
                        f"{grad_norm:.4g}) with learning_rate {lr:g}. Lower learning_rate (e.g. --set learning_rate="
                        f"{lr / 10:g}) or max_grad_norm (now {self.recipe.max_grad_norm:g}). {kept}")


def to_device(module, device, dtype=None):
    """Move a module; cast only when the dtype changes (diffusers warns on a no-op ``to(dtype)``)."""
    import torch

    module.to(device)
    if dtype is not None and dtype != torch.float32:
        module.to(dtype=dtype)
    return module


def refuse_sdxl(protocol: Protocol, pipeline_class: type | None) -> None:
    """Stop with a UserError when the base's pipeline class (None: not known) is SDXL, which no trainer trains."""
    from ..family import SDXL, family_of

    if pipeline_class is not None and family_of(pipeline_class) == SDXL:
        raise UserError(f"Base model '{protocol.base_model}' is SDXL ({pipeline_class.__name__}), and train-baseline "
                        f"does not train SDXL: its trainers ({', '.join(METHODS)}) train Stable Diffusion 1.x/2.x "
                        f"pipelines (UNet, VAE, one CLIP text encoder). Train SDXL adapters with another tool (e.g. "
                        f"diffusers' train_dreambooth_lora_sdxl.py) and evaluate them with `kps-bench run --adapter`, "
                        f"which loads SDXL LoRAs, two-encoder textual inversions and fine-tuned SDXL pipelines; or "
                        f"train on an SD 1.x/2.x base (the protocol's base_model).")


def make_trainer(method: str, protocol: Protocol, subject_name: str, out, device: str = "auto", overrides=(),
                 resume: bool = False, stop_after: int | None = None, seed: int | None = None) -> Trainer:
    """Validate every input (method, base model family, subject, references, recipe, output folder) before anything
    is written or loaded; the caller has checked that ``out`` can be written and holds its lock. ``seed`` overrides
    the recipe's."""
    from ..family import declared_pipeline_class
    from ..run import reference_images

    if method not in METHODS:
        raise UserError(f"Unknown training method '{method}'. Known methods: {', '.join(METHODS)}.")
    refuse_sdxl(protocol, declared_pipeline_class(protocol.resolve(protocol.base_model, "pipeline")))
    subject = protocol.subject(subject_name)
    reference_images(protocol, subject)
    recipe, sources = load_recipe(method, protocol, overrides, seed)
    out = Path(out).expanduser()
    work = partial_dir(out)
    if out.exists():
        raise UserError(f"--out '{out}' already exists; kps-bench does not overwrite a trained adapter. Choose another "
                        f"--out or delete it.")
    if work.exists() and not resume:
        raise UserError(f"'{work}' holds an interrupted training run; pass --resume to continue it, or delete it to "
                        f"start over.")
    return Trainer(method, protocol, subject, recipe, sources, out, work, device, resume, stop_after)
