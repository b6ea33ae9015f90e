"""Tiny random-weight Hugging Face models of every supported model_type, and checkpoint directories of them.

``tiny_model`` builds the transformers model (the reference); ``write_checkpoint`` saves it the way a user
gets a model from the Hub: ``save_pretrained`` safetensors, config.json (in the current ``rope_parameters``
form or rewritten into the older ``rope_theta``/``rope_scaling`` form), tokenizer.json and
tokenizer_config.json. The tokenizer is the default model's (SmolLM2), built from its GGUF's metadata
as the runtime does (tools/make_checkpoint.py writes the same files from the converted store).
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, vocab_size=300)
SMOLLM_VOCAB = 49152  # the default model's tokenizer: a checkpoint that uses it needs this many embedding rows
TEMPLATES = Path(__file__).parent / "data" / "templates"


def tiny_config(model_type: str, **over):
    import transformers

    kw = dict(TINY)
    kw.update(copy.deepcopy(over))  # transformers edits dict arguments (rope_scaling) in place
    if model_type == "llama":
        cfg = transformers.LlamaConfig(**kw)
    elif model_type == "mistral":
        kw.setdefault("sliding_window", None)
        cfg = transformers.MistralConfig(**kw)
    elif model_type == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
    elif model_type == "qwen3":
        kw.setdefault("head_dim", 32)
        cfg = transformers.Qwen3Config(**kw)
    else:
        raise ValueError(model_type)
    return cfg


def tiny_model(model_type: str, seed: int = 0, **over):
    """A transformers model with random weights, float32, eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **over)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # make norms and biases non-trivial so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


@lru_cache(maxsize=1)
def smollm_tokenizer() -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer metadata) of the default model, from its GGUF header only."""
    from offload_rt.loader import default_model_path
    from storage.gguf_tokenizer import build_tokenizer
    from storage.sources import parse_gguf_header

    path = default_model_path()
    return build_tokenizer(parse_gguf_header(path)[0], path)


def template(name: str) -> str:
    """A real chat template kept under tests/data/templates/."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def write_tokenizer(dest: Path, *, chat_template: str | None = None, **special) -> None:
    """tokenizer.json + tokenizer_config.json (SmolLM2's vocabulary; template and special tokens as given)."""
    tok_json, meta = smollm_tokenizer()
    (dest / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    cfg = {"bos_token": meta["bos_token"], "eos_token": meta["eos_token"], "pad_token": meta["eos_token"],
           "unk_token": "<|endoftext|>", "add_bos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": 8192, "tokenizer_class": "PreTrainedTokenizerFast",
           "chat_template": meta["chat_template"] if chat_template is None else chat_template}
    cfg.update(special)
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")


def old_form(cfg: dict) -> dict:
    """config.json as transformers < 5 wrote it: top-level ``rope_theta``, ``rope_scaling``, ``torch_dtype``."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    cfg.pop("layer_types", None)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


def write_checkpoint(dest: Path, model, *, form: str = "new", dtype: torch.dtype | None = None,
                     config_edit: dict | None = None, chat_template: str | None = None) -> Path:
    """Save ``model`` as a Hub-style checkpoint directory (weights in ``dtype``, default as they are).

    ``form``: "new" keeps what the installed transformers writes (``rope_parameters``), "old" rewrites it
    into the pre-5.0 keys. ``config_edit``: keys set in config.json afterwards (None deletes a key).
    """
    assert form in ("new", "old")
    dest = Path(dest)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(dest)
    cfg_file = dest / "config.json"
    cfg = json.loads(cfg_file.read_text())
    assert "rope_parameters" in cfg and "rope_theta" not in cfg, "transformers wrote an unexpected config form"
    if form == "old":
        cfg = old_form(cfg)
    for k, v in (config_edit or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_file.write_text(json.dumps(cfg, indent=1))
    write_tokenizer(dest, chat_template=chat_template)
    return dest
