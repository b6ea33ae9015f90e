"""The baselines: Hugging Face transformers (resident) and accelerate disk offload.

Run in its own process so that each side's memory and threads are its own:

    python -m tools.hf_baseline MODEL --dtype bfloat16 --new-tokens 32
    python -m tools.hf_baseline MODEL --dtype bfloat16 --new-tokens 32 --max-memory 1000MiB --offload-folder DIR

Prints one JSON line on stdout: prompt_tokens, new_tokens, prefill_s, decode_s, decode_tok_s, peak_rss_bytes.
Decode time = time(generate N tokens) - time(generate 1 token), so prefill is excluded
exactly as offload-run's --stats excludes it. MODEL may be a checkpoint directory or a .gguf
file (transformers dequantizes GGUF to float32 on load).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def load(model: Path, dtype: torch.dtype, max_memory: str | None, offload_folder: str | None):
    import transformers

    kw = {"dtype": dtype}
    if model.suffix == ".gguf":
        src, kw["gguf_file"] = str(model.parent), model.name
    else:
        src = str(model)
    tok = transformers.AutoTokenizer.from_pretrained(src, **({"gguf_file": kw["gguf_file"]} if "gguf_file" in kw else {}))
    if max_memory:
        kw.update(device_map="auto", max_memory={"cpu": max_memory}, offload_folder=offload_folder,
                  offload_state_dict=True)
    m = transformers.AutoModelForCausalLM.from_pretrained(src, **kw)
    return tok, m.eval()


def peak_rss() -> int:
    from offload_rt.stats import peak_rss_bytes

    return peak_rss_bytes()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-memory", default=None, help="accelerate max_memory for the CPU, e.g. 1000MiB")
    p.add_argument("--offload-folder", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    tok, model = load(a.model, dtype, a.max_memory, a.offload_folder)
    load_s = time.perf_counter() - t0
    ids = tok(PROMPT, return_tensors="pt").input_ids
    gen = dict(do_sample=False, pad_token_id=tok.eos_token_id or 0)
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **gen)
        tn = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    decode_s = max(1e-9, tn - t1)
    rec = {"impl": "accelerate" if a.max_memory else "transformers", "prompt_tokens": ids.shape[1], "new_tokens": n,
           "load_s": round(load_s, 3), "prefill_s": round(t1, 4), "decode_s": round(decode_s, 4),
           "decode_tok_s": round((n - 1) / decode_s, 4),
           "peak_rss_bytes": peak_rss()}
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
