"""``cat``: the LoRA of ``lora.py`` trained with the Contrastive Adapter Training loss.

Park et al. 2024, "CAT: Contrastive Adapter Training for Personalized Image Generation"
(arXiv 2404.07554; official code github.com/OnomaAi101/CAT)::

    L = || eps - eps_{theta+Delta}(z_t, t, tau(y_T)) ||^2
        + lambda * || eps_{theta+Delta}(z_t, t, tau(y)) - sg[eps_theta(z_t, t, tau(y))] ||^2

``y_T`` is the training caption with the trigger, ``y`` the same caption with the trigger removed,
``theta`` the frozen base, ``Delta`` the adapter, ``sg`` stop-gradient; both terms share z_t, t, eps.
``lambda`` is the recipe's ``cat_weight``.

Unlike the official code (two UNets, three forward passes) there is one UNet: the base prediction
comes from the same UNet with the adapter disabled, under ``torch.no_grad()``, and the two adapter
predictions are one batched forward pass. With ``cat_weight: 0`` the gradient path is exactly the
``lora`` trainer's (the preservation term is then only measured, without gradients), so the result
is bit-identical to ``lora`` with the same recipe and seed.
"""

from __future__ import annotations

import contextlib

from .lora import add_lora, caption_embeddings, mse, save
from .trainer import Trainer, Training

__all__ = ["adapter_disabled", "build", "cat_loss", "save"]  # save: the LoRA file of ``lora``


@contextlib.contextmanager
def adapter_disabled(unet):
    """The base model theta: the same UNet with every LoRA layer bypassed (exactly the base weights)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def cat_loss(model, unet, batch, target, emb_trigger, emb_free, cat_weight: float):
    """(total, denoise, preserve) for one batch. ``model`` may be the accelerate-wrapped ``unet``."""
    import torch

    z_t, t = batch.noisy, batch.timesteps
    with torch.no_grad(), adapter_disabled(unet):
        base = model(z_t, t, emb_free).sample  # sg[eps_theta(z_t, t, tau(y))]
    if cat_weight == 0:
        pred_trigger = model(z_t, t, emb_trigger).sample
        with torch.no_grad():
            pred_free = model(z_t, t, emb_free).sample  # logged only: no gradient flows through it
    else:
        both = model(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([emb_trigger, emb_free])).sample
        pred_trigger, pred_free = both.chunk(2)
    denoise = mse(pred_trigger, target)
    preserve = mse(pred_free, base.detach())
    total = denoise + cat_weight * preserve if cat_weight else denoise
    return total, denoise, preserve


def build(trainer: Trainer) -> Training:
    """The LoRA of ``lora``; the loss: denoising on the trigger caption + lambda * preservation on the trigger-free
    one."""
    trainer.pipe.vae.to("cpu")
    emb_trigger, emb_free = caption_embeddings(trainer)
    unet, params = add_lora(trainer)
    weight = trainer.recipe.cat_weight

    def loss(model, batch):
        idx = batch.caption_index
        total, denoise, preserve = cat_loss(model, trainer.accelerator.unwrap_model(model), batch,
                                            trainer.data.target(batch), emb_trigger[idx], emb_free[idx], weight)
        return total, {"loss": total.item(), "loss_denoise": denoise.item(), "loss_preserve": preserve.item()}

    return Training(params, unet, loss)
