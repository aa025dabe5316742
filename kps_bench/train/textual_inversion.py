"""``textual-inversion``: learn the embedding of a new token (the subject's trigger), nothing else.

Follows diffusers' ``examples/textual_inversion/textual_inversion.py``: the token is added to the
tokenizer, its embedding row is initialised from the class noun, the whole embedding matrix is
handed to AdamW, and after every step every other row is restored from a copy of the original, so
they stay bit-identical (weight decay would otherwise move them). With ``num_vectors: N > 1`` the
tokens are ``<trigger>, <trigger>_1, ... <trigger>_{N-1}``, as diffusers' loader expects. Output:
``learned_embeds.safetensors`` = ``{trigger: float32 [num_vectors, hidden]}`` (diffusers' format).
"""

from __future__ import annotations

import dataclasses

from ..errors import UserError
from ..models import TI_FILE
from .lora import mse
from .trainer import Trainer, Training, to_device

EMBEDDINGS = "text_encoder.token_embedding"  # the one trained parameter


def placeholder_tokens(trigger: str, n: int) -> list[str]:
    return [trigger] + [f"{trigger}_{i}" for i in range(1, n)]


def check_new_tokens(tokenizer, tokens: list[str], subject_name: str) -> None:
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab]
    if taken:
        raise UserError(f"Textual inversion needs a new token, but the trigger '{taken[0]}' of subject '{subject_name}' "
                        f"already exists in the base model's tokenizer (its learned embedding would be ignored). Give the "
                        f"subject a trigger that is not a token (e.g. '<{tokens[0]}>') in the protocol's subjects.trigger.")


def build(trainer: Trainer) -> Training:
    """The new token(s), initialised from the class noun; only the embedding matrix trains. The loss: the
    epsilon-prediction loss through the frozen UNet, gradients only into the embeddings."""
    import torch

    r, subject = trainer.recipe, trainer.subject
    tokenizer, te = trainer.pipe.tokenizer, trainer.pipe.text_encoder
    tokens = placeholder_tokens(subject.trigger, r.num_vectors)
    check_new_tokens(tokenizer, tokens, subject.name)
    init_ids = tokenizer.encode(subject.class_noun, add_special_tokens=False)
    if not init_ids:
        raise UserError(f"The class noun '{subject.class_noun}' of subject '{subject.name}' tokenises to nothing; "
                        f"textual inversion initialises the new token from it.")
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise UserError(f"Could not add the token(s) {tokens} to the tokenizer (added {added}).")
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    te.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = te.get_input_embeddings().weight
    with torch.no_grad():
        init = embeddings[init_ids].mean(0)  # several tokens (e.g. a two-word noun): their mean
        for i in new_ids:
            embeddings[i] = init
    te.requires_grad_(False)
    te.to(trainer.device)
    embeddings = te.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    original = embeddings.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=embeddings.device)
    keep[new_ids] = False
    if r.gradient_checkpointing:
        te.gradient_checkpointing_enable()
    te.train()
    unet = to_device(trainer.pipe.unet, trainer.device, trainer.weight_dtype)
    trainer.pipe.vae.to("cpu")
    spelled = dataclasses.replace(subject, trigger=" ".join(tokens))
    prompts = trainer.data.captions.expand(spelled, True)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(trainer.device)
    trainer.extra["textual_inversion"] = {"tokens": tokens, "initializer": subject.class_noun,
                                          "initializer_token_ids": init_ids}

    def loss(model, batch):
        states = model(ids[batch.caption_index])[0]
        pred = unet(batch.noisy, batch.timesteps, states.to(trainer.weight_dtype)).sample
        loss = mse(pred, trainer.data.target(batch))
        return loss, {"loss": loss.item()}

    def restore_other_rows():
        with torch.no_grad():
            embeddings[keep] = original[keep]

    return Training({EMBEDDINGS: embeddings}, te, loss, after_step=restore_other_rows)


def save(trainer: Trainer, training: Training) -> list[str]:
    """diffusers' learned_embeds format: {trigger: [num_vectors, hidden]}."""
    from safetensors.torch import save_file

    new_ids = trainer.pipe.tokenizer.convert_tokens_to_ids(trainer.extra["textual_inversion"]["tokens"])
    learned = training.params[EMBEDDINGS].detach()[new_ids].float().cpu().contiguous()
    if trainer.accelerator.is_main_process:
        save_file({trainer.subject.trigger: learned}, str(trainer.work / TI_FILE))
    return [TI_FILE]
