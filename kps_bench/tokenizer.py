"""The real CLIP BPE tokenizer as a transformers ``CLIPTokenizer``, built from open_clip's BPE file.

open_clip ships ``bpe_simple_vocab_16e6.txt.gz``; the vocabulary and merges derived from it are
exactly those of OpenAI's CLIP (49,408 tokens), so a tokenizer saved here tokenises like
``openai/clip-vit-large-patch14``'s.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

N_MERGES = 49152 - 256 - 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    from open_clip.tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and merge rules of CLIP's BPE, read from open_clip's BPE file."""
    if bpe_path is None:
        from open_clip.tokenizer import default_bpe

        bpe_path = default_bpe()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_clip_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config of a ``CLIPTokenizer`` to ``out_dir``."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(
        vocab=str(out / "vocab.json"),
        merges=str(out / "merges.txt"),
        model_max_length=model_max_length,
    )
    tok.save_pretrained(out)
    return out
