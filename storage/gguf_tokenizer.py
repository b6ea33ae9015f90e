"""A ``tokenizers`` tokenizer.json built from a GGUF file's metadata.

A GGUF carries no tokenizer.json: the vocabulary, merges, token types and special ids are stored
under llama.cpp's ``tokenizer.ggml.*`` keys. We rebuild the tokenizer the way Hugging Face
transformers does when it loads a GGUF (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``),
so both tokenize identically:

* ``gpt2``  -- byte-level BPE; the split regex chosen by ``tokenizer.ggml.pre`` (GPT-2's own
  ByteLevel regex when the name is not one with a known regex, e.g. SmolLM's "smollm");
* ``llama`` -- SentencePiece-style BPE with byte fallback (merges from the file, or derived from
  the vocabulary and scores when it has none).

Control tokens (token_type 3) become special added tokens, user-defined ones (4) plain added tokens.
"""

from __future__ import annotations

from pathlib import Path

from storage.errors import ModelSourceError

CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex (as transformers' GGUF loader maps them); others use GPT-2's ByteLevel regex.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary and its scores (best first), as transformers derives them."""
    merges = []
    for merge, score in scores.items():
        local = []
        for i in range(1, len(merge)):
            left, right = merge[:i], merge[i:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def build_tokenizer(meta: dict, path: Path | str = "GGUF") -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer metadata for the manifest) from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ModelSourceError(f"{path} has no tokenizer in its metadata; use a GGUF exported with its tokenizer")
    tokens = [str(t) for t in tokens]
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    merges_meta = meta.get("tokenizer.ggml.merges")

    def tid(key):
        v = meta.get(key)
        return int(v) if isinstance(v, int) and 0 <= v < len(tokens) else None

    bos_id, eos_id = tid("tokenizer.ggml.bos_token_id"), tid("tokenizer.ggml.eos_token_id")
    if "tokenizer.ggml.add_bos_token" in meta:
        add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
    else:
        add_bos = kind == "llama"  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise

    if kind == "gpt2":
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
                 for i, t in enumerate(tokens)}
        if merges_meta is None:
            raise ModelSourceError(f"{path} has a byte-level BPE tokenizer without merges; re-export the GGUF file")
        merges = [tuple(m.split(" ", 1)) for m in merges_meta]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                   byte_fallback=False, ignore_merges=False))
        split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is not None:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        special_ok = lambda t: set(t) <= alphabet  # noqa: E731  (a control token outside the alphabet is a mislabel)
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges_meta is not None:
            merges = [tuple(m.split(" ", 1)) for m in merges_meta]
        else:
            scores = meta.get("tokenizer.ggml.scores")
            if scores is None:
                raise ModelSourceError(f"{path} has a sentencepiece tokenizer without scores or merges; re-export the GGUF file")
            merges = _generate_merges(vocab, dict(zip(tokens, (float(s) for s in scores))))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=True,
                                   byte_fallback=True, ignore_merges=False))
        prepend = "never" if meta.get("tokenizer.ggml.add_space_prefix") is False else "first"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        special_ok = lambda t: True  # noqa: E731
    else:
        raise ModelSourceError(f"{path} uses an unsupported GGUF tokenizer ({kind!r}); supported: gpt2 (byte-level BPE) "
                               "and llama (sentencepiece); use a Hugging Face checkpoint directory instead")

    specials = [AddedToken(t, normalized=False, special=True)
                for t, ty in zip(tokens, types) if (ty == CONTROL or (kind == "llama" and ty == UNKNOWN)) and special_ok(t)]
    if specials:
        tok.add_special_tokens(specials)
    vocab_now = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab_now]
    if user:
        tok.add_tokens(user)

    bos = tokens[bos_id] if bos_id is not None else None
    eos = tokens[eos_id] if eos_id is not None else None
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1", special_tokens=[])
    eos_ids = [eos_id] if eos_id is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = tid(key)
        if v is not None and v not in eos_ids:
            eos_ids.append(v)
    template = meta.get("tokenizer.chat_template")
    info = {"file": "tokenizer.json", "chat_template": template if isinstance(template, str) else None,
            "bos_token": bos, "eos_token": eos, "bos_token_id": bos_id, "eos_token_ids": eos_ids,
            "add_bos_token": add_bos}
    return tok.to_str(), info
