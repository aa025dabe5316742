"""``lora``: a peft LoRA on the UNet attention projections, trained with the epsilon-prediction loss.

Reads like diffusers' ``train_dreambooth_lora.py`` without prior preservation: :func:`build` (the LoRA and its
loss), then :func:`save`; the loop is :meth:`~kps_bench.train.trainer.Trainer.fit`.
The output is ``pytorch_lora_weights.safetensors`` written by diffusers' ``save_lora_weights``, so
``pipe.load_lora_weights(OUT)`` loads it with plain diffusers.
"""

from __future__ import annotations

from ..models import LORA_FILE, sort_safetensors_metadata
from .trainer import Trainer, Training, to_device

ADAPTER = "default"


def add_lora(trainer: Trainer):
    """Freeze the base UNet (in the mixed-precision dtype), add the LoRA, keep its parameters float32."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    r = trainer.recipe
    unet = trainer.pipe.unet
    unet.requires_grad_(False)
    to_device(unet, trainer.device, trainer.weight_dtype)
    torch.manual_seed(r.seed)
    unet.add_adapter(LoraConfig(r=r.rank, lora_alpha=r.alpha, init_lora_weights="gaussian",
                                target_modules=list(r.target_modules)), adapter_name=ADAPTER)
    cast_training_params(unet, dtype=torch.float32)
    if r.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    return unet, params


def caption_embeddings(trainer: Trainer):
    """Frozen text-encoder states of every caption, with and without the trigger (computed once)."""
    te = to_device(trainer.pipe.text_encoder, trainer.device, trainer.weight_dtype)
    with_trigger = trainer.encode_prompts(trainer.data.captions.with_trigger).float()
    without = trainer.encode_prompts(trainer.data.captions.without_trigger).float()
    te.to("cpu")
    return with_trigger, without


def mse(a, b):
    import torch.nn.functional as F

    return F.mse_loss(a.float(), b.float(), reduction="mean")


def build(trainer: Trainer) -> Training:
    """Frozen base, caption embeddings computed once, the LoRA; the loss
    || eps - eps_{theta+Delta}(z_t, t, tau(y_T)) ||^2."""
    trainer.pipe.vae.to("cpu")
    emb_trigger, _ = caption_embeddings(trainer)
    unet, params = add_lora(trainer)

    def loss(model, batch):
        pred = model(batch.noisy, batch.timesteps, emb_trigger[batch.caption_index]).sample
        loss = mse(pred, trainer.data.target(batch))
        return loss, {"loss": loss.item()}

    return Training(params, unet, loss)


def save(trainer: Trainer, training: Training) -> list[str]:
    """diffusers' save_lora_weights -> pytorch_lora_weights.safetensors (with the LoRA config as metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = trainer.accelerator.unwrap_model(training.model)
    # peft's key names (lora_A / lora_B), which load_lora_weights reads as they are; diffusers'
    # convert_state_dict_to_diffusers renames only attention keys, and a LoRA on convolutions saved
    # through it loads with its convolutions silently dropped
    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    # the same weights must give the same file bytes (and sha256) in every process: peft keeps
    # target_modules as a set (string-hash order) and safetensors writes the metadata map in hash order
    config = unet.peft_config[ADAPTER]
    metadata = {**config.to_dict(), "target_modules": sorted(config.target_modules)}
    if trainer.accelerator.is_main_process:
        StableDiffusionPipeline.save_lora_weights(
            trainer.work, unet_lora_layers=layers, weight_name=LORA_FILE, safe_serialization=True,
            unet_lora_adapter_metadata=metadata)
        sort_safetensors_metadata(trainer.work / LORA_FILE)
    trainer.extra["lora"] = {"rank": trainer.recipe.rank, "alpha": trainer.recipe.alpha,
                             "target_modules": list(trainer.recipe.target_modules), "tensors": len(layers)}
    return [LORA_FILE]
