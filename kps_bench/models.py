"""Loading base pipelines and adapters (LoRA, textual inversion, fine-tuned pipelines) safely.

Base models are a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a local diffusers folder, or
``builtin:NAME``. Only safetensors weights are read unless the user passes ``allow_unsafe_pickle``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .rundir import sha256_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
ADAPTER_KINDS = ("auto", "lora", "textual-inversion", "pipeline", "none")
LORA_FILE = "pytorch_lora_weights.safetensors"
TI_FILE = "learned_embeds.safetensors"
ADAPTER_NAME = "kps"

SCHEDULER_CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm-solver": ("DPMSolverMultistepScheduler", {}),
    "dpm-solver-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def quiet_progress_bars() -> None:
    """diffusers' and transformers' own loading bars would interleave with kps-bench's progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


DEVICE_FORMS = "auto, cpu, cuda, cuda:N (N = the GPU's index), mps"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other form must name a visible device."""
    import torch

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise UserError(f"--device '{device}' is not a device kps-bench can use. Give one of: {DEVICE_FORMS}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"--device {device}: only {n} CUDA GPU(s) are visible (cuda:0 to cuda:{n - 1}).")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but Apple's MPS is not available here; use --device cpu or auto.")
    return device


# ----------------------------------------------------------------------------- hashing


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime) for the process (SD checkpoints are GBs)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]


def folder_weight_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every weight and config file under a model folder, keyed by relative path."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix in (".json", ".txt")) and ".cache" not in p.parts:
            out[str(p.relative_to(folder))] = file_sha256(p)
    return out


def combined_hash(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def model_identity(spec: str, resolved: str, loaded_from: str | None = None) -> dict:
    """What pins a model: a local folder's content hash, or a hub id with its resolved commit."""
    p = Path(resolved)
    if p.exists():
        hashes = folder_weight_hashes(p) if p.is_dir() else {p.name: file_sha256(p)}
        return {"spec": spec, "path": str(p.resolve()), "sha256": combined_hash(hashes), "files": hashes}
    revision = None
    if loaded_from:
        m = re.search(r"snapshots[/\\]([0-9a-f]{40})", loaded_from)
        revision = m.group(1) if m else None
    return {"spec": spec, "hub_id": resolved, "revision": revision}


# ----------------------------------------------------------------------------- safety


def refuse_pickle(path: Path, allow_unsafe_pickle: bool, what: str) -> None:
    if path.suffix in PICKLE_SUFFIXES and not allow_unsafe_pickle:
        raise UserError(
            f"{what} '{path}' is a pickle file ({path.suffix}). Loading pickle can run arbitrary code, so kps-bench "
            f"only reads .safetensors by default. Convert it to safetensors, or pass --allow-unsafe-pickle if you "
            f"trust its source."
        )


def tensor_shapes(path: Path, what: str, allow_unsafe_pickle: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a weight file: safetensors (read from the header), or a pickle
    checkpoint when ``allow_unsafe_pickle`` (loaded on the CPU)."""
    if path.suffix in PICKLE_SUFFIXES:
        return {k: tuple(v.shape) for k, v in load_weights(path, what, allow_unsafe_pickle).items()}
    check_safetensors(path, what)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def load_weights(path: Path, what: str, allow_unsafe_pickle: bool) -> dict:
    """The tensors of a safetensors file, or of a pickle checkpoint when ``allow_unsafe_pickle``; nested
    dicts (textual inversion's ``string_to_param``) are flattened to dotted names."""
    refuse_pickle(path, allow_unsafe_pickle, what)
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise UserError(f"{what} '{path}' is neither a .safetensors file nor a pickle checkpoint "
                        f"({', '.join(PICKLE_SUFFIXES)}).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors(path, what)
        return load_file(str(path))
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{what} '{path}' is not a readable checkpoint of tensors ({str(e).splitlines()[0]}). It may "
                        f"be truncated or corrupt: re-download or re-save it.") from None

    def flat(d, prefix=""):
        for k, v in (d.items() if isinstance(d, dict) else ()):
            if isinstance(v, torch.Tensor):
                yield f"{prefix}{k}", v
            elif isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")

    tensors = dict(flat(state))
    if not tensors:
        raise UserError(f"{what} '{path}' holds no tensors (found {type(state).__name__}).")
    return tensors


def check_safetensors(path: Path, what: str) -> list[str]:
    """The keys of a safetensors file; a clear error if it is missing or corrupt."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{what} '{path}' is not a valid safetensors file ({e}). It may be truncated or corrupt: "
                        f"re-download or re-save it.") from None


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header in place with its ``__metadata__`` entries sorted by key.

    safetensors writes that map in a per-process hash order, so the same tensors and metadata saved by
    two processes differ in bytes (and sha256) whenever there are two or more entries. The header keeps
    its length (padded with spaces, as the format allows), so tensor offsets are unchanged."""
    import struct

    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        meta = header.get("__metadata__")
        if not meta or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # a longer header would move every tensor's offset
            raise RuntimeError(f"re-serialised safetensors header of '{path}' is longer than the original")
        f.seek(8)
        f.write(text.ljust(n, b" "))


def _check_folder_is_safe(folder: Path, allow_unsafe_pickle: bool, what: str) -> bool:
    """True when the folder has safetensors weights; refuses a pickle-only folder without the flag."""
    weights = [p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    has_safe = any(p.suffix == ".safetensors" for p in weights)
    if weights and not has_safe and not allow_unsafe_pickle:
        refuse_pickle(next(p for p in weights if p.suffix in PICKLE_SUFFIXES), False, what)
    for p in weights:
        if p.suffix == ".safetensors":
            check_safetensors(p, what)
    return has_safe


# ----------------------------------------------------------------------------- pipelines


@dataclass
class LoadedModel:
    pipe: object | None  # None once released (see :func:`apply_adapter`)
    identity: dict

    @property
    def dtype(self) -> str:
        """The dtype of the loaded weights (``float16``...), which provenance records rather than the one asked for."""
        return str(self.pipe.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class SpeedFlags:
    """Optional generation speed-ups (``--compile``, ``--channels-last``, ``--tf32``). They may change the last bits of
    pixels on a GPU, so provenance records them and they are part of each image's cache key."""

    compile: bool = False
    channels_last: bool = False
    tf32: bool = False

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in ("compile", "channels_last", "tf32") if getattr(self, name))

    def apply(self, pipe) -> None:
        """TF32 matmuls and convolutions (process-wide), channels-last UNet and VAE, a compiled UNet."""
        import torch

        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if self.compile:
            pipe.unet.compile()  # in place: adapters loaded later into the UNet are compiled with it


def load_pipeline(spec: str, resolved: str, device: str, dtype: str, scheduler: str,
                  allow_unsafe_pickle: bool = False, components: dict | None = None) -> LoadedModel:
    """Load a text-to-image diffusers pipeline (SD 1.x/2.x/XL) on ``device`` with the protocol's scheduler;
    ``components`` (name -> loaded module) are used as they are instead of being loaded."""
    from diffusers import AutoPipelineForText2Image

    quiet_progress_bars()
    p = Path(resolved)
    local = p.exists()
    if local:
        if not (p / "model_index.json").is_file():
            raise UserError(f"Base model '{spec}' resolves to '{p}', which is not a diffusers pipeline folder "
                            f"(no model_index.json). Give a folder saved with `pipeline.save_pretrained()` or a hub id.")
        use_safe = _check_folder_is_safe(p, allow_unsafe_pickle, "Base model weights")
    else:
        check_hub_id(spec, resolved)
        use_safe = not allow_unsafe_pickle
    kwargs = {"dtype": torch_dtype(dtype), "safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(resolved, use_safetensors=use_safe or None, **kwargs,
                                                         **(components or {}))
    except OSError as e:
        if local:
            raise UserError(f"Cannot load the diffusers pipeline in '{p}': {e}") from None
        raise UserError(f"Cannot load base model '{resolved}': it is not a local folder and could not be fetched "
                        f"from the hub ({str(e).splitlines()[0]}). Check the id, or download it and pass the folder.") from None
    set_scheduler(pipe, scheduler)
    if getattr(pipe, "watermark", None) is not None:  # SDXL's invisible watermark changes pixels, like the safety
        pipe.watermark = None                       # checker blacks them out: both would bias the metrics
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    loaded_from = getattr(pipe.unet.config, "_name_or_path", None) if hasattr(pipe, "unet") else None
    return LoadedModel(pipe, {**model_identity(spec, resolved, loaded_from), "pipeline_class": type(pipe).__name__})


def check_hub_id(spec: str, resolved: str) -> None:
    """Fail at once, without asking the hub, for a base model that can only be a missing local folder, or a hub
    id that is not in the local cache while ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", resolved) or resolved.endswith((".", "-")):
        raise UserError(f"Base model '{spec}' is not a local folder ('{resolved}' does not exist) and not a hub id "
                        f"(org/name). Check the path in base_model (or --base).")
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(resolved, "model_index.json"), str):
        raise UserError(f"Cannot load base model '{resolved}': it is not a local folder and not reachable on the hub "
                        f"(HF_HUB_OFFLINE is set and the hub cache has no copy). Check the id, or download it and "
                        f"pass the folder.")


def set_scheduler(pipe, name: str) -> None:
    import diffusers

    cls_name, extra = SCHEDULER_CLASSES[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


# ----------------------------------------------------------------------------- adapters


@dataclass
class AdapterInfo:
    """What was applied on top of the base: kind, the adapter's files and their sha256, and training metadata."""

    kind: str
    path: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    training: dict | None = None
    #: What it loads into, from :func:`check_adapter_fits`: a LoRA's modules per component (``{"modules": {"unet":
    #: 32, ...}}``, ``other`` for keys that name no component); a textual inversion's token and embedding shape per
    #: text encoder (``{"token": "sks", "text_encoders": {"text_encoder": [1, 768], "text_encoder_2": [1, 1280]}}``).
    targets: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "files": self.files, "training": self.training,
                "targets": self.targets}


def detect_adapter_kind(path: Path) -> str:
    """Guess the kind from the files: model_index.json -> pipeline, LoRA / learned-embeds files, or keys."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "pipeline"
        for kind, stem in (("lora", "pytorch_lora_weights"), ("textual-inversion", "learned_embeds")):
            if any((path / f"{stem}{suf}").is_file() for suf in WEIGHT_SUFFIXES):
                return kind
        raise UserError(f"Cannot tell what adapter '{path}' is: it has no model_index.json (pipeline), "
                        f"{LORA_FILE} (LoRA) or {TI_FILE} (textual inversion). Pass --adapter-kind.")
    if path.suffix == ".safetensors":
        keys = check_safetensors(path, "Adapter file")
        return "lora" if any("lora" in k for k in keys) else "textual-inversion"
    if "lora" in path.name:
        return "lora"
    return "textual-inversion"


def adapter_file(path: Path, kind: str, allow_unsafe_pickle: bool) -> Path:
    """The weight file of a LoRA or textual-inversion adapter given as a folder or a file."""
    if path.is_dir():
        stem = "pytorch_lora_weights" if kind == "lora" else "learned_embeds"
        found = [path / f"{stem}{suf}" for suf in WEIGHT_SUFFIXES if (path / f"{stem}{suf}").is_file()]
        if not found:
            raise UserError(f"Adapter folder '{path}' has no {stem}.safetensors for --adapter-kind {kind}.")
        path = found[0]
    refuse_pickle(path, allow_unsafe_pickle, "Adapter file")
    if path.suffix == ".safetensors":
        check_safetensors(path, "Adapter file")
    return path


def read_training_json(path: Path) -> dict | None:
    """The trainer's ``training.json`` next to an adapter (method, subject, recipe), if any."""
    folder = path if path.is_dir() else path.parent
    f = folder / "training.json"
    if not f.is_file():
        return None
    try:
        training = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"'{f}' is not valid JSON ({getattr(e, 'msg', e)}); re-run the trainer or delete the "
                        f"file.") from None
    if not isinstance(training, dict):
        raise UserError(f"'{f}' must hold a JSON object (method, subject, recipe, ...), got a "
                        f"{type(training).__name__}; re-run the trainer or delete the file.")
    return training


def resolve_adapter(adapter: str | None, kind: str, allow_unsafe_pickle: bool) -> AdapterInfo:
    """Validate the adapter path and kind before any model is loaded."""
    if kind not in ADAPTER_KINDS:
        raise UserError(f"--adapter-kind must be one of {', '.join(ADAPTER_KINDS)}, got '{kind}'.")
    if adapter is None:
        if kind not in ("auto", "none"):
            raise UserError(f"--adapter-kind {kind} needs --adapter PATH.")
        return AdapterInfo("none")
    if kind == "none":
        raise UserError("--adapter was given together with --adapter-kind none; drop one of them.")
    path = Path(adapter).expanduser()
    if not path.exists():
        raise UserError(f"Adapter path '{adapter}' does not exist. Give the folder written by the trainer "
                        f"(or a LoRA / learned-embeds .safetensors file, or a pipeline folder).")
    if kind == "auto":
        kind = detect_adapter_kind(path)
    if kind == "pipeline":
        if not (path / "model_index.json").is_file():
            raise UserError(f"--adapter-kind pipeline needs a diffusers pipeline folder; '{path}' has no model_index.json.")
        _check_folder_is_safe(path, allow_unsafe_pickle, "Adapter pipeline weights")
        files = folder_weight_hashes(path)
    else:
        f = adapter_file(path, kind, allow_unsafe_pickle)
        files = {f.name: file_sha256(f)}
        path = f
    return AdapterInfo(kind, str(path), files, read_training_json(path))


def apply_adapter(loaded: LoadedModel, info: AdapterInfo, triggers: list[str], device: str, dtype: str,
                  scheduler: str, allow_unsafe_pickle: bool = False) -> object:
    """The pipeline that makes adapter images: the base with the adapter loaded, or the fine-tuned pipeline.

    A fine-tuned pipeline takes the base's place, so the two are never on the device at once: it reuses the base's
    components whose files it shares (DreamBooth leaves the VAE and the tokenizer, often the text encoder, as they
    were), and the base pipeline is released (``loaded.pipe`` becomes None) before the other weights load."""
    if info.kind == "none":
        return loaded.pipe
    if info.kind == "pipeline":
        shared = unchanged_components(loaded, info)
        release(loaded)
        return load_pipeline(info.path, info.path, device, dtype, scheduler, allow_unsafe_pickle, shared).pipe
    pipe = loaded.pipe
    if info.kind == "lora":
        load_lora_checked(pipe, Path(info.path), allow_unsafe_pickle)
    elif info.kind == "textual-inversion":
        load_textual_inversion_checked(pipe, Path(info.path), triggers, allow_unsafe_pickle)
    return pipe


def unchanged_components(loaded: LoadedModel, info: AdapterInfo) -> dict:
    """The base's loaded components (name -> module) whose files a fine-tuned pipeline folder holds unchanged. A base
    from the hub has no file hashes to compare: nothing is shared."""
    base_files = loaded.identity.get("files") or {}

    def files(hashes: dict, name: str) -> dict:
        return {k: v for k, v in hashes.items() if k.startswith(f"{name}/")}

    return {name: module for name, module in loaded.pipe.components.items()
            if module is not None and files(base_files, name) and files(base_files, name) == files(info.files, name)}


def release(loaded: LoadedModel) -> None:
    """Drop the pipeline of ``loaded`` and return the device memory of whatever nothing else holds."""
    import gc

    import torch

    loaded.pipe = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_adapter_fits(pipe, info: AdapterInfo, triggers: list[str], allow_unsafe_pickle: bool = False) -> dict:
    """Open a LoRA or textual-inversion adapter and check it against the base pipeline without loading it
    (module shapes; embedding sizes and triggers), so a misfit is found before any image is made. Returns what it
    loads into (:attr:`AdapterInfo.targets`)."""
    if info.kind == "lora":
        names = lora_module_names(list(check_lora_shapes(pipe, Path(info.path), allow_unsafe_pickle)))
        per_component = {c: sum(n.startswith(f"{c}.") for n in names) for c in pipe.components}
        modules = {c: n for c, n in per_component.items() if n}
        if other := len(names) - sum(modules.values()):  # keys in another format (kohya's), named otherwise
            modules["other"] = other
        return {"modules": modules}
    if info.kind == "textual-inversion":
        embeddings = textual_inversion_state(pipe, Path(info.path), triggers, allow_unsafe_pickle)
        return {"token": triggers[0], "text_encoders": {name: list(t.shape) for name, t in embeddings.items()}}
    return {}


_LORA_PARTS = r"lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up|lora_linear_layer\.down|lora_linear_layer\.up"
_LORA_WEIGHT = re.compile(rf"^(.*)\.({_LORA_PARTS})(\.[^.]+)?\.weight$")


def check_lora_shapes(pipe, file: Path, allow_unsafe_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """The LoRA's tensor shapes, after checking each against the base module it adapts (input size of the
    down/A matrix, output size of the up/B matrix). Returns the shapes."""
    shapes = tensor_shapes(file, "LoRA file", allow_unsafe_pickle)
    modules = {f"{comp_name}.{mod_name}": m for comp_name, comp in pipe.components.items()
               if hasattr(comp, "named_modules") for mod_name, m in comp.named_modules()}
    for key in sorted(shapes):
        m = _LORA_WEIGHT.match(key)
        weight = getattr(modules.get(m.group(1)), "weight", None) if m else None
        if weight is None or weight.ndim < 2:
            continue
        down = m.group(2).endswith(("A", "down"))
        shape = shapes[key]
        axis = 1 if down else 0
        if len(shape) < 2 or shape[axis] != weight.shape[axis]:
            raise UserError(
                f"LoRA '{file}' does not fit the base model: its tensor '{key}' has shape {list(shape)}, but the "
                f"base's module '{m.group(1)}' has weight shape {list(weight.shape)} ({'input' if down else 'output'} "
                f"size {weight.shape[axis]}). The shapes do not match the base: the LoRA was probably trained for "
                f"another base model (e.g. SDXL rather than SD 1.5). Use it with the base it was trained for "
                f"(base_model, or --base).")
    return shapes


def lora_module_names(keys: list[str]) -> set[str]:
    """The module each LoRA tensor belongs to (peft ``lora_A``/``lora_B``, diffusers' ``lora.down`` and, for text
    encoders, ``lora_linear_layer.down`` keys)."""
    pattern = re.compile(rf"\.({_LORA_PARTS}|lora_magnitude_vector)(\.[^.]+)*\.(weight|bias)$|\.alpha$")
    return {pattern.sub("", k) for k in keys if "lora" in k or k.endswith(".alpha")}


def count_lora_layers(pipe, adapter_name: str = ADAPTER_NAME) -> int:
    """How many modules of the pipeline's UNet/transformer and text encoders carry ``adapter_name``."""
    n = 0
    for comp in pipe.components.values():
        if not hasattr(comp, "named_modules"):
            continue
        for _, m in comp.named_modules():
            lora_a = getattr(m, "lora_A", None)
            if lora_a is not None and hasattr(lora_a, "keys") and adapter_name in lora_a.keys():
                n += 1
    return n


def modules_present(pipe, names: set[str]) -> int:
    """How many ``component.module.path`` names (``unet.down_blocks.0...``) exist in the pipeline."""
    present = {f"{comp_name}.{mod_name}" for comp_name, comp in pipe.components.items()
               if hasattr(comp, "named_modules") for mod_name, _ in comp.named_modules()}
    return sum(n in present for n in names)


def load_lora_checked(pipe, file: Path, allow_unsafe_pickle: bool = False) -> int:
    """Load a diffusers-format LoRA; fail if its shapes do not fit the base, or if none of its modules matched the
    base (the silent "no effect" LoRA)."""
    keys = sorted(check_lora_shapes(pipe, file, allow_unsafe_pickle))
    names = lora_module_names(keys)
    problem = None
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER_NAME)
        matched = count_lora_layers(pipe)
    except (ValueError, KeyError, RuntimeError) as e:
        matched, problem = modules_present(pipe, names), str(e).strip().splitlines()[0]
    if matched == 0 or problem:
        raise UserError(f"LoRA '{file}' matched {matched} of its {len(names)} modules in the base model, so it cannot "
                        f"be applied{f' ({problem})' if problem else ' and would have no effect'}. Its keys (e.g. "
                        f"'{keys[0]}') name modules this base does not have: it was trained for another base "
                        f"architecture, or saved in an unsupported format. Check base_model, or re-save the LoRA with "
                        f"diffusers' save_lora_weights for this base.")
    if matched < len(names):
        import warnings

        warnings.warn(f"LoRA '{file}': only {matched} of its {len(names)} modules matched the base model.")
    return matched


#: (text encoder, tokenizer, key of SDXL's two-encoder embedding files) of each CLIP text encoder a pipeline may have
TEXT_ENCODERS = (("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "clip_g"))


def text_encoders(pipe) -> list[tuple[str, str, str]]:
    """The :data:`TEXT_ENCODERS` entries the pipeline has: one for SD 1.x/2.x, two for SDXL."""
    return [names for names in TEXT_ENCODERS if getattr(pipe, names[0], None) is not None]


def one_embedding(state: dict, file: Path) -> tuple[str, object]:
    """``(key, embedding [vectors, size])`` of a one-encoder file: diffusers' ``{token: tensor}`` (or ``emb_params``),
    or A1111's ``string_to_param``."""
    if len(state) == 1:
        return next(iter(state.items()))
    if "string_to_param.*" in state:
        return "string_to_param.*", state["string_to_param.*"]
    raise UserError(f"Textual-inversion file '{file}' holds {len(state)} tensors ({', '.join(sorted(state)[:4])}), not "
                    f"one embedding: diffusers' format is {{token: [vectors, size]}}, SDXL's {{'clip_l': ..., "
                    f"'clip_g': ...}}. Give the file a textual-inversion trainer wrote.")


def textual_inversion_state(pipe, file: Path, triggers: list[str], allow_unsafe_pickle: bool = False) -> dict:
    """The learned embedding ``[vectors, size]`` for each of the base's text encoders (component name -> tensor): the
    file's one embedding for SD 1.x/2.x, its ``clip_l`` and ``clip_g`` for SDXL's two encoders. Checks that the
    trigger is a new token of every tokenizer and that each embedding has its encoder's size."""
    encoders = text_encoders(pipe)
    for trigger in triggers:
        for _, tokenizer, _ in encoders:
            if trigger in getattr(pipe, tokenizer).get_vocab():
                raise UserError(f"Textual-inversion token '{trigger}' already exists in the base model's {tokenizer}, "
                                f"so its learned embedding would be ignored. Choose a trigger that is not a token "
                                f"(e.g. '<{trigger}>') in the protocol's subjects.trigger.")
    state = load_weights(file, "Textual-inversion file", allow_unsafe_pickle)
    if len(triggers) != 1:
        raise UserError(f"Textual-inversion file '{file}' holds one concept; evaluate it for one subject with --subject NAME.")
    sizes = {name: getattr(pipe, name).get_input_embeddings().weight.shape[-1] for name, _, _ in encoders}
    two_encoder_keys = {key for _, _, key in TEXT_ENCODERS}
    if len(encoders) > 1:
        if not two_encoder_keys <= set(state):
            raise UserError(f"Textual-inversion file '{file}' holds a one-encoder embedding "
                            f"({', '.join(sorted(state))}), but the base model is SDXL, whose two text encoders each "
                            f"need theirs. Give an SDXL embedding: a safetensors file with 'clip_l' [vectors, "
                            f"{sizes['text_encoder']}] for text_encoder and 'clip_g' [vectors, "
                            f"{sizes['text_encoder_2']}] for text_encoder_2, as SDXL textual-inversion trainers write "
                            f"it; or evaluate this one with the SD 1.x/2.x base it was trained for (base_model, or "
                            f"--base).")
        embeddings = {name: (key, state[key]) for name, _, key in encoders}
    elif two_encoder_keys <= set(state):
        raise UserError(f"Textual-inversion file '{file}' is an SDXL embedding ('clip_l' and 'clip_g', one per SDXL "
                        f"text encoder), but the base model has one text encoder. Evaluate it with the SDXL base it "
                        f"was trained for (base_model, or --base).")
    else:
        embeddings = {name: one_embedding(state, file) for name, _, _ in encoders}
    for name, (key, t) in embeddings.items():
        encoder = "text encoder" if len(encoders) == 1 else name
        if t.shape[-1] != sizes[name]:
            raise UserError(f"Textual-inversion file '{file}': embedding '{key}' has size {t.shape[-1]}, but the base "
                            f"model's {encoder} uses embeddings of size {sizes[name]}. It was trained for another base "
                            f"model; use it with that base (base_model, or --base).")
    return {name: t for name, (_, t) in embeddings.items()}


def load_textual_inversion_checked(pipe, file: Path, triggers: list[str], allow_unsafe_pickle: bool = False) -> None:
    """Load the learned embeddings under the subject's trigger into every text encoder (checked by
    :func:`textual_inversion_state`)."""
    embeddings = textual_inversion_state(pipe, file, triggers, allow_unsafe_pickle)
    try:
        for encoder, tokenizer, _ in text_encoders(pipe):
            pipe.load_textual_inversion(embeddings[encoder], token=triggers[0], text_encoder=getattr(pipe, encoder),
                                        tokenizer=getattr(pipe, tokenizer))
    except ValueError as e:
        raise UserError(f"Textual-inversion file '{file}' could not be loaded: {e}") from None
