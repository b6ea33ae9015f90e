"""The engine: one loaded model, its weight source and its KV cache, running forward passes.

The engine walks the model's groups in order — embedding lookup, decoder layers,
head — taking each group's tensors from a :class:`WeightSource`. A resident source
hands out tensors it holds; the pipeline scheduler (issue 3) is another source that
streams groups from disk while earlier groups compute. The model functions never
know which.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch

from kernels_cpu.matvec import decode_scope, embedding
from offload_rt import models
from offload_rt.kv import expect_prompt
from offload_rt.kv.dense import DenseKV
from offload_rt.threads import torch_threads
from offload_rt.trace import NullTracer


@dataclass(frozen=True)
class Group:
    """A unit of placement and streaming: the tensors one step of the sweep needs."""

    name: str  # "layer.3", "head"
    kind: str  # "layer" | "head"
    index: int  # layer index, -1 for the head
    tensors: tuple[tuple[str, str], ...]  # (key the model uses, tensor name in the store)
    experts: str | None = None  # a MoE layer: the store name of its packed routed experts (placed apart)


def model_groups(args) -> list[Group]:
    """The sweep order: decoder layers 0..N-1, then the head (final norm + output projection)."""
    groups = []
    for i in range(args.num_hidden_layers):
        prefix = models.LAYER_PREFIX.format(i)
        groups.append(Group(f"layer.{i}", "layer", i, tuple((s, prefix + s) for s in args.layer_tensors(i)),
                            experts=args.expert_tensor(i)))
    groups.append(Group("head", "head", -1, tuple((n, n) for n in args.head_tensors())))
    return groups


class WeightSource(Protocol):
    """Where the engine gets its tensors. Implementations: resident dict, pipeline scheduler."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows for ids [T] -> [T, hidden] in the compute dtype."""

    def sweep(self) -> Iterator[tuple[Group, Mapping[str, torch.Tensor]]]:
        """Each group of :func:`model_groups` in order with its tensors, valid until the next item."""

    def close(self) -> None: ...


class ResidentWeights:
    """Every tensor loaded into memory once (the device tier, which on CPU is host RAM)."""

    def __init__(self, groups: Sequence[Group], load: Callable[[str], torch.Tensor], embed_name: str,
                 experts: Callable[[str], object] | None = None, dtype: torch.dtype | None = None):
        """``load(name)`` gives a tensor; ``experts(name)`` a MoE layer's expert set (models.ops.ExpertSet)
        from its packed experts' store name (needed only for models with MoE layers)."""
        self.groups = list(groups)
        cache: dict[str, torch.Tensor] = {}

        def get(name: str) -> torch.Tensor:
            if name not in cache:
                cache[name] = load(name)
            return cache[name]

        def table(g: Group) -> dict:
            t = {key: get(name) for key, name in g.tensors}
            if g.experts is not None:
                if experts is None:
                    raise ValueError(f"{g.name} has routed experts ({g.experts}) but no expert loader was given")
                t["experts"] = experts(g.experts)
            return t

        self._tables = [table(g) for g in self.groups]
        self._embed = get(embed_name)
        self.dtype = dtype  # the compute dtype rows are returned in (a quantized table's rows come as float32)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        rows = embedding(ids, self._embed)
        return rows if self.dtype is None else rows.to(self.dtype)

    def sweep(self):
        return zip(self.groups, self._tables)

    def close(self) -> None:
        self._tables = []


class Engine:
    """Forward passes with a prefix-reusing KV cache (batch 1)."""

    def __init__(self, args, source: WeightSource, dtype: torch.dtype, *,
                 max_tokens: int | None = None, prefill_chunk: int = 512, tracer=None,
                 device: torch.device | str = "cpu", thread_tuner=None, prefill_threads: int | None = None,
                 on_warm: Callable[[], object] | None = None, kv_device: torch.device | str | None = None,
                 synchronize: Callable[[], None] | None = None, cache=None):
        self.args, self.source, self.dtype = args, source, dtype
        self.device = torch.device(device)
        self.max_tokens = max_tokens or args.max_position_embeddings
        # The cache the run built where the plan put the KV (offload_rt.kv); by default one dense
        # buffer per layer on kv_device (the compute device unless given).
        self.cache = cache if cache is not None else DenseKV(
            args.num_hidden_layers, args.num_key_value_heads, args.head_dim, dtype, self.max_tokens,
            device=self.device if kv_device is None else kv_device, compute_device=self.device)
        self._synchronize = synchronize
        self.family = models.of(args)  # the model's forward functions (offload_rt.models)
        self.rope = self.family.Rope(args, dtype, self.device)
        self.prefill_chunk = max(1, prefill_chunk)
        self.tokens: list[int] = []  # ids whose K/V are in the cache, in order
        self.tracer = tracer or NullTracer()
        self.passes = 0  # forward passes run (trace "pass" numbers)
        self.thread_tuner = thread_tuner  # picks decode threads from step times (None: keep the current count)
        self.prefill_threads = prefill_threads  # torch threads for prefill passes (None: torch's current count)
        self.on_warm = on_warm  # called after each of the first two forward passes (the app drops library page cache)

    def forward(self, ids: Sequence[int], *, positions: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
        """Run ids (appended after the cached tokens) through the model; logits of the last one.

        Speculation (a tree of candidate tokens in one pass): ``positions`` [T] are the tokens' absolute
        positions (default: consecutive after the cache), ``tree_mask`` [T, S] (True = attend) replaces the
        causal mask over the last S keys, the T new tokens and the S - T cached just before them (a draft
        expanding the tree it has partly cached; every earlier key is visible to all), and ``all_logits``
        returns [T, vocab], the logits after every token. The T tokens are committed to the cache;
        :meth:`keep` then keeps the accepted ones.
        """
        start = self.cache.offset
        tr, k = self.tracer, self.passes
        decode = len(ids) == 1 and self.device.type == "cpu"
        tuner = self.thread_tuner if decode else None
        n_threads = tuner.next() if tuner is not None else None
        t0 = time.perf_counter()
        if decode:
            scope = decode_scope(n_threads)
        elif self.prefill_threads and self.device.type == "cpu":
            scope = torch_threads(self.prefill_threads)
        else:
            scope = nullcontext()
        with scope, tr.span("compute", "forward", tokens=len(ids), **{"pass": k}):
            with tr.span("compute", "embed", group="embed", **{"pass": k}):
                t = torch.tensor(list(ids), dtype=torch.long, device=self.device)
                x = self.source.embed(t)
                rope = self._rope(start, len(ids), positions)
            logits = None
            for group, w in self.source.sweep():
                with tr.span("compute", group.name, group=group.name, **{"pass": k}):
                    if group.kind == "layer":
                        x = self.family.layer_forward(self.args, w, x, self.cache, group.index, rope, start,
                                                      tree_mask=tree_mask)
                    else:
                        logits = self.family.head_forward(self.args, w, x if all_logits else x[-1:])
                        logits = logits if all_logits else logits[0]
        if tuner is not None:
            tuner.record(n_threads, time.perf_counter() - t0)
        self.passes += 1
        if self.passes <= 2 and self.on_warm is not None:
            self.on_warm()  # after the first prefill and the first decode pass: new code paths were touched
        self.cache.commit(len(ids))
        self.tokens.extend(ids)
        return logits

    def _rope(self, start: int, n: int, positions: torch.Tensor | None):
        """cos/sin for the new tokens: consecutive from ``start``, or gathered at ``positions``."""
        if positions is None:
            return self.rope.tables(start, n)
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if pos.numel() != n or int(pos.min()) < 0:
            raise ValueError(f"positions: {n} non-negative positions expected, got {pos.tolist()[:8]}...")
        cos, sin = self.rope.tables(0, int(pos.max()) + 1)
        pos = pos.to(cos.device)
        return cos.index_select(0, pos), sin.index_select(0, pos)

    def keep(self, start: int, rows: Sequence[int]) -> None:
        """Keep, of the tokens from ``start`` on, only those at offsets ``rows`` (sorted), packed from
        ``start``: after verifying a tree, the accepted path (in the cache and in :attr:`tokens`)."""
        self.cache.keep(start, rows)
        kept = [self.tokens[start + r] for r in rows]
        del self.tokens[start:]
        self.tokens.extend(kept)

    def prefill(self, ids: Sequence[int], progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Bring the cache to exactly ``ids[:-0]`` reusing the longest cached prefix; return last logits.

        At least the last token is always recomputed, since its logits are needed. Passes start at
        absolute multiples of ``prefill_chunk`` (the first one runs from the reused prefix up to the next
        multiple): the passes after the first are those a prefill from scratch runs, and when the reused
        prefix ends at a multiple (the prefix cache's granule, :mod:`offload_rt.kv.prefix`) all of them
        are, so the K/V and logits are the same bits as without the reuse.
        """
        if not ids:
            raise ValueError("prefill needs at least one token")
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        self.cache.trim(self.cache.offset - common)
        del self.tokens[common:]
        P, n = self.prefill_chunk, len(ids)
        edges = [common, *range((common // P + 1) * P, n, P), n]
        expect_prompt(self.cache, n)  # a cache may prepare the decode steps at the pass that reaches the end
        logits = None
        for lo, hi in zip(edges, edges[1:]):
            logits = self.forward(ids[lo:hi])
            if progress:
                progress(hi - common, n - common)
        return logits

    def synchronize(self) -> None:
        """Wait for the device work queued so far (timers end here; a no-op on the CPU)."""
        if self._synchronize is not None:
            self._synchronize()

    def reset(self) -> None:
        self.cache.reset()
        self.tokens.clear()

    def close(self) -> None:
        self.source.close()
        close = getattr(self.cache, "close", None)
        if close is not None:
            close()  # a spilled KV cache removes its chunk files
