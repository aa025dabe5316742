"""Recipes: every hyperparameter of a training run, read through the config layer (:mod:`kps_bench.config`).

The effective recipe is ``baselines/<method>.yaml`` after the recipes it inherits, then the protocol's
``training.defaults`` and ``training.<method>`` sections, then ``--set`` and ``--seed`` (:func:`load_recipe`). Its
training captions must not be evaluation prompts (:func:`check_prompt_overlap`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

from ..config import RECIPES, apply_sets, coerce, list_files, read_mapping, resolve_inherit, search_dirs
from ..errors import UserError
from ..protocol import Protocol, Subject, canonical_json, expand_prompt

METHODS = ("cat", "lora", "dreambooth", "textual-inversion")
PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of one training run. Method-specific fields are only accepted for their method."""

    method: str
    # optimisation
    steps: int = 1000  # optimizer steps
    # the global batch of one optimizer step is batch_size * gradient_accumulation_steps images, whatever the number
    # of processes: they share it (see split_batch)
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    scale_lr: bool = False  # multiply the learning rate by the global batch
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "no"  # accelerate mixed precision: no | fp16 | bf16 (trainable parameters stay float32)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    # data
    resolution: int = 512
    random_flip: bool = True
    crop_margin: float = 0.125  # random crop: the image is encoded at (1 + margin) x resolution and cropped in latent space
    captions: tuple[str, ...] = ()  # caption templates with {subject}; empty = the protocol's prompts
    # probability that a training sample gets the empty prompt (the unconditional branch that
    # classifier-free guidance subtracts), so the adapter moves it consistently with the captioned one
    caption_dropout: float = 0.0
    # lora / cat
    rank: int = 1
    alpha: float = 1.0
    # peft target_modules (module-name suffixes); default: the UNet attention projections, as diffusers' scripts
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    cat_weight: float = 1.0
    # dreambooth
    prior_loss_weight: float = 1.0
    num_class_images: int = 200
    class_prompt: str = "a {class_noun}"  # the prompt of the class images and their prior-preservation caption
    class_sample_steps: int = 50
    class_guidance_scale: float = 7.5
    train_text_encoder: bool = False
    # textual inversion
    num_vectors: int = 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["captions"] = list(self.captions)
        d["target_modules"] = list(self.target_modules)
        return {k: v for k, v in d.items() if k in allowed_fields(self.method)}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step, over every process."""
        return self.batch_size * self.gradient_accumulation_steps


_METHOD_ONLY = {
    "rank": ("lora", "cat"), "alpha": ("lora", "cat"), "target_modules": ("lora", "cat"), "cat_weight": ("cat",),
    "prior_loss_weight": ("dreambooth",), "num_class_images": ("dreambooth",), "class_prompt": ("dreambooth",),
    "class_sample_steps": ("dreambooth",), "class_guidance_scale": ("dreambooth",),
    "train_text_encoder": ("dreambooth",), "num_vectors": ("textual-inversion",),
}
_SET_EXAMPLE = "--set steps=200, --set cat_weight=0.5 or --set \"captions.0=a photo of a {subject}\""


def allowed_fields(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(Recipe) if method in _METHOD_ONLY.get(f.name, (method,))]


def recipe_file_layers(method: str) -> list[tuple[str, dict]]:
    """The recipe file of ``method`` (``baselines/METHOD.yaml``, see :data:`kps_bench.config.RECIPES`) and the
    files it inherits, root first, as (file, mapping)."""
    if method not in METHODS:
        raise UserError(f"Unknown training method '{method}'. Known methods: {', '.join(METHODS)}.")

    def lookup(name: str) -> tuple[str, dict] | None:
        known = list_files(RECIPES)
        return (str(known[name]), read_mapping(known[name], RECIPES)) if name in known else None

    first = lookup(method)
    if first is None:
        raise UserError(f"No recipe for '{method}': {method}.yaml is in none of "
                        f"{', '.join(map(str, search_dirs(RECIPES))) or './baselines'} (add a folder with "
                        f"${RECIPES.env}).")
    return _one_method(resolve_inherit(first, lookup, sorted(list_files(RECIPES)), "recipe"), method)


def protocol_layers(protocol: Protocol, method: str) -> list[tuple[str, dict]]:
    """The protocol's ``training.defaults`` and ``training.METHOD`` sections, the latter after the sections it
    inherits (``inherit: lora``), as (where, mapping)."""
    where = f"protocol '{protocol.name}' training"
    training = {k: v or {} for k, v in protocol.training.items()}
    unknown = sorted(set(training) - {"defaults", *METHODS})
    if unknown:
        raise UserError(f"{where}: unknown section '{unknown[0]}'; expected 'defaults' or a method "
                        f"({', '.join(METHODS)}).")
    for section, part in training.items():
        if not isinstance(part, dict):
            raise UserError(f"{where}.{section}: must be a mapping of recipe fields, got {type(part).__name__}.")
    if "inherit" in training.get("defaults", {}):
        raise UserError(f"{where}.defaults: field 'inherit' belongs in a method section (e.g. training.cat: "
                        f"{{inherit: lora}}); the defaults apply to every method already.")
    layers = [(f"{where}.defaults", training["defaults"])] if "defaults" in training else []
    if method in training:
        def lookup(name: str) -> tuple[str, dict] | None:
            return (f"{where}.{name}", training[name]) if name in METHODS and name in training else None

        known = [m for m in METHODS if m in training]
        layers += _one_method(resolve_inherit((f"{where}.{method}", training[method]), lookup, known,
                                              "method section of 'training'"), method)
    return layers


def _one_method(chain: list[tuple[str, dict]], method: str) -> list[tuple[str, dict]]:
    """``chain`` without its ``method`` fields, after checking that the last one given (an inheriting layer's
    overrides its parent's) is ``method``."""
    named = [(where, layer["method"]) for where, layer in chain if "method" in layer]
    if named:
        _check_field("method", named[-1][1], method, named[-1][0])
    return [(where, {k: v for k, v in layer.items() if k != "method"}) for where, layer in chain]


def load_recipe(method: str, protocol: Protocol | None = None, overrides=(),
                seed: int | None = None) -> tuple[Recipe, list[str]]:
    """The effective recipe and where its values came from, in merge order: the recipe file after the files it
    inherits, the protocol's ``training.defaults``, its ``training.METHOD`` after the sections that inherits, the
    ``--set`` overrides, then ``seed`` (``train-baseline --seed``). With a protocol, its training captions must not be
    evaluation prompts (:func:`check_prompt_overlap`)."""
    layers = recipe_file_layers(method) + (protocol_layers(protocol, method) if protocol is not None else [])
    values: dict = {}
    origin: dict[str, str] = {}
    for where, layer in layers:
        for name, value in layer.items():
            _check_field(name, value, method, where)
            values[name], origin[name] = value, where
    sources = [w for w, _ in layers]
    if overrides:
        merged = apply_sets(values, overrides, "the recipe", _SET_EXAMPLE)
        for name, value in merged.items():
            if name not in values or value != values[name]:
                _check_field(name, value, method, "--set")
                values[name], origin[name] = value, "--set"
        sources.append("--set")
    if seed is not None:
        values["seed"], origin["seed"] = seed, "--seed"
        sources.append("--seed")
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    recipe = Recipe(method=method, **{name: coerce(v, types[name], name, origin[name]) for name, v in values.items()
                                      if name != "method"})
    validate_recipe(recipe, " <- ".join(reversed(sources)))
    if protocol is not None:
        check_prompt_overlap(protocol, recipe, origin.get("captions", "the recipe's default"))
    return recipe, sources


def _check_field(name: str, value, method: str, where: str) -> None:
    """A field a layer gives must be one of ``method``'s (``method`` itself only with this method's name)."""
    if name == "method":
        if value != method:
            raise UserError(f"{where}: field 'method' is '{value}' but this is the '{method}' recipe.")
        return
    if name not in allowed_fields(method):
        hint = f" ('{name}' is only used by {', '.join(_METHOD_ONLY[name])})" if name in _METHOD_ONLY else ""
        note = " ('inherit' is read in recipe files and method sections only)" if name == "inherit" else ""
        raise UserError(f"{where}: unknown field '{name}' for method '{method}'{hint}{note}. Allowed fields: "
                        f"{', '.join(a for a in allowed_fields(method) if a != 'method')}.")


def validate_recipe(r: Recipe, where: str) -> None:
    def req(ok, name, expected):
        if not ok:
            raise UserError(f"recipe ({where}): field '{name}' must be {expected}, got {getattr(r, name)!r}.")

    for name in ("steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "rank",
                 "num_class_images", "class_sample_steps", "num_vectors"):
        req(getattr(r, name) >= 1, name, "an integer >= 1")
    req(r.seed >= 0, "seed", "an integer >= 0")
    req(r.learning_rate > 0, "learning_rate", "a number > 0")
    req(r.lr_scheduler in LR_SCHEDULES, "lr_scheduler", f"one of {', '.join(LR_SCHEDULES)}")
    req(r.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
    req(r.resolution >= 8 and r.resolution % 8 == 0, "resolution", "a multiple of 8")
    req(0 <= r.crop_margin <= 1, "crop_margin", "a number between 0 and 1")
    req(0 <= r.caption_dropout < 1, "caption_dropout", "a probability in [0, 1)")
    req(r.lr_warmup_steps >= 0, "lr_warmup_steps", "an integer >= 0")
    req(r.max_grad_norm > 0, "max_grad_norm", "a number > 0")
    req(r.cat_weight >= 0, "cat_weight", "a number >= 0")
    req(r.prior_loss_weight >= 0, "prior_loss_weight", "a number >= 0")
    req(r.alpha > 0, "alpha", "a number > 0")
    req("{class_noun}" in r.class_prompt, "class_prompt", "a template containing '{class_noun}', e.g. \"a {class_noun}\"")
    for i, c in enumerate(r.captions):
        if "{subject}" not in c:
            raise UserError(f"recipe ({where}): field 'captions' item {i} must contain '{{subject}}', got {c!r}.")


def training_prompts(protocol: Protocol, subject: Subject, recipe: Recipe) -> dict[str, tuple[str, str]]:
    """Every prompt ``recipe`` trains ``subject`` on -> (its template, the recipe field it comes from): the captions
    with and without the trigger, and DreamBooth's class prompt."""
    out = {}
    for t in caption_templates(protocol, subject, recipe):
        for trigger in (True, False):
            out.setdefault(expand_prompt(t, subject, trigger), (t, "captions"))
    if recipe.method == "dreambooth":
        out.setdefault(expand_prompt(recipe.class_prompt, subject, False), (recipe.class_prompt, "class_prompt"))
    return out


def check_prompt_overlap(protocol: Protocol, recipe: Recipe, captions_from: str) -> None:
    """Refuse a recipe that trains a subject of ``protocol`` on one of that subject's evaluation prompts (with or
    without the trigger, each side expanded by :func:`expand_prompt`), unless the protocol says
    ``allow_prompt_overlap: true``. ``captions_from`` names the layer that set the recipe's captions."""
    if protocol.allow_prompt_overlap:
        return
    found = []
    for s in protocol.subjects:
        trained = training_prompts(protocol, s, recipe)
        field_name = f"prompt_sets.{s.prompt_set}" if s.prompt_set else "prompts"
        for i, p in enumerate(protocol.prompts_for(s)):
            for text in dict.fromkeys(expand_prompt(p, s, trigger) for trigger in (True, False)):
                if text in trained:
                    found.append((*trained[text], f"{field_name}.{i}", p, s.name, text))
    if not found:
        return
    template, recipe_field, field_name, prompt, subject, text = found[0]
    source = (f"field 'class_prompt' of the {recipe.method} recipe" if recipe_field == "class_prompt" else
              f"field 'captions', set by {captions_from}" if recipe.captions else
              f"the protocol's prompts, which an empty 'captions' ({captions_from}) trains on")
    more = f" ({len(found) - 1} more overlap{'s' if len(found) > 2 else ''} like it)" if len(found) > 1 else ""
    raise UserError(f"{protocol.file or 'protocol ' + repr(protocol.name)}: the {recipe.method} training prompt "
                    f"'{template}' (from {source}) equals the evaluation prompt '{prompt}' (field '{field_name}') for "
                    f"subject '{subject}': both give '{text}'{more}. Training on evaluation prompts leaks the "
                    f"evaluation into training. Expected training captions disjoint from the evaluation prompts: set "
                    f"training.defaults.captions (or --set captions=[...]) to templates that are not evaluation "
                    f"prompts, such as \"a photo of a {{subject}}\" where that is not one; or set "
                    f"allow_prompt_overlap: true in the protocol to accept the overlap (recorded in provenance).")


def caption_templates(protocol: Protocol, subject: Subject, recipe: Recipe) -> list[str]:
    """The recipe's caption templates, or the subject's evaluation prompts when it has none (refused by
    :func:`check_prompt_overlap` unless the protocol allows the overlap)."""
    return list(recipe.captions) or list(protocol.prompts_for(subject))




def split_batch(recipe: Recipe, processes: int) -> tuple[int, int]:
    """Each process's (micro-batch, accumulation steps), so that ``processes`` of them make the recipe's global batch:
    the micro-batch is split when it divides evenly, else the accumulation steps are."""
    if recipe.batch_size % processes == 0:
        return recipe.batch_size // processes, recipe.gradient_accumulation_steps
    if recipe.gradient_accumulation_steps % processes == 0:
        return recipe.batch_size, recipe.gradient_accumulation_steps // processes
    raise UserError(f"recipe: the global batch of batch_size {recipe.batch_size} x gradient_accumulation_steps "
                    f"{recipe.gradient_accumulation_steps} cannot be shared by {processes} processes: field 'batch_size' "
                    f"or 'gradient_accumulation_steps' must be a multiple of {processes} (e.g. --set batch_size="
                    f"{math.lcm(recipe.batch_size, processes)}, which changes the recipe), or launch a number of "
                    f"processes that divides one of them.")
