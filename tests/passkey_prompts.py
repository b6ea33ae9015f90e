"""Passkey retrieval prompts and a greedy reader that shares one prefill between attention modes.

The classic long-context probe (Mohtashami & Jaggi, "Landmark attention"): a five-digit key
hidden at some depth in repetitive filler, then asked for. The filler carries no information,
so the key is found only if decode attention reaches back to the one sentence that holds it:
exactly what MagicPIG's sampling may miss and exact attention may not. Used by
tests/test_passkey.py and by tools/bench_longctx.py (its prompt file).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "\nWhat is the pass key? The pass key is"
FILLER_TOKENS = 24  # one filler sentence in the default model's tokenizer (for callers without a tokenizer)


def needle(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def passkey_text(key: int, n_filler: int, depth: float) -> str:
    """The prompt: intro, ``n_filler`` filler sentences with the needle after ``round(depth * n_filler)``
    of them, the question (no chat template)."""
    before = round(depth * n_filler)
    return INTRO + FILLER * before + needle(key) + FILLER * (n_filler - before) + QUESTION


def filler_for(tokenizer, tokens: int) -> int:
    """How many filler sentences bring a prompt to about ``tokens`` tokens (the text is additive in
    tokens: every piece starts with a space or a newline)."""
    fixed = len(tokenizer.encode(passkey_text(10000, 0, 0.0)))
    per = len(tokenizer.encode(FILLER * 16)) / 16
    return max(1, int((tokens - fixed) / per))


@dataclass(frozen=True)
class Passkey:
    key: int
    depth: float  # where the needle sits, 0 = right after the intro, 1 = right before the question
    ids: list[int]


def make_prompts(tokenizer, n: int, tokens: int, *, seed: int = 0, chat: bool = False) -> list[Passkey]:
    """``n`` prompts of about ``tokens`` tokens, keys and depths drawn from ``seed``, in order of depth.

    Depths are stratified (prompt i's is uniform in [i/n, (i+1)/n)): random, yet every part of the
    context is probed even with a few prompts, and consecutive prompts share the filler before the
    earlier one's needle, which the engine's prefix reuse then does not prefill again. ``chat`` wraps
    each prompt in the model's chat template (one user message) instead of sending it raw.
    """
    rng = random.Random(seed)
    n_filler = filler_for(tokenizer, tokens)
    out = []
    for i in range(n):
        key, depth = rng.randint(10000, 99999), (i + rng.random()) / n
        text = passkey_text(key, n_filler, depth)
        ids = tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
        out.append(Passkey(key, depth, ids))
    return out


def answers(engine, ids: Sequence[int], modes: Sequence[str], n_new: int = 8) -> dict[str, list[int]]:
    """Greedy ``n_new`` tokens after ``ids`` once per attention mode of the engine's TieredKV.

    The prompt is prefilled once (reusing whatever prefix the engine already holds); each mode
    decodes from the same prefill logits and is trimmed back to the prompt afterwards, so only
    decode attention differs between modes (prefill attention is exact in every mode, as in a run).
    """
    import torch  # here: tools/bench_longctx imports the prompt builder and stays free of torch

    cache = engine.cache
    with torch.inference_mode():
        logits = engine.prefill(list(ids))
        first = int(torch.argmax(logits))
        out: dict[str, list[int]] = {}
        for mode in modes:
            cache.attention = mode
            toks = [first]
            for _ in range(n_new - 1):
                toks.append(int(torch.argmax(engine.forward([toks[-1]]))))
            out[mode] = toks
            cache.trim(n_new - 1)
            del engine.tokens[len(ids):]
        cache.attention = "exact"
    return out
