"""``offload-run``: a thin click command that builds a RunConfig and calls the library."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click

from offload_rt.config import KV_SELECT_SHARE, RunConfig, SamplingConfig, parse_size
from offload_rt.errors import UsageError, UserError


def _fail(message: str, debug: bool, code: int = 2) -> None:
    """One line on stderr, exit status 2; --debug re-raises for the traceback."""
    if debug:
        raise
    first = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    print(f"offload-run: error: {first}", file=sys.stderr)
    sys.exit(code)


def _kv_cpu_mem(text: str | None) -> int | None:
    size = parse_size(text, option="--kv-cpu-mem")
    if isinstance(size, str):
        raise UsageError("--kv-cpu-mem takes a size (e.g. 2G, 512M), not 'auto'")
    return size


def _draft(text: str | None) -> str | None:
    if text is None:
        return None
    if not text.strip():
        raise UsageError("--draft needs a model path or 'self-int4'")
    return text


def _spec_budget(budget: int | None, draft: str | None) -> int | None:
    if budget is None:
        return None
    if draft is None:
        raise UsageError("--spec-budget sizes the speculation tree of --draft; pass --draft too (e.g. --draft self-int4)")
    from offload_rt.spec.budget import check_budget

    try:
        return check_budget(budget)
    except ValueError as e:
        raise UsageError(str(e)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="offload_rt", prog_name="offload-run", message="%(prog)s %(version)s")
@click.argument("model", required=False)
@click.option("--prompt", "-p", help="Answer this prompt and exit.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), help="Read the prompt from a file.")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype (default: the checkpoint's; float32 for GGUF).")
@click.option("--weights", type=click.Choice(["auto", "bf16", "f16", "f32", "int8", "int4"]), default="auto",
              show_default=True,
              help="Stored weight format: auto keeps the source's (GGUF quants stay quantized); int8/int4 quantize "
                   "the matrices at conversion (group-wise, 32 per group); a float type stores every tensor in it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--gpu-mem", default=None, help="GPU memory budget: 8G, 512M, 0, auto.")
@click.option("--cpu-mem", default=None, help="Host RAM budget for weights/KV: 16G, auto.")
@click.option("--offload-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where converted weight stores live (the disk tier). Default: ~/.cache/offload_rt/stores.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--stats", is_flag=True, help="Print one JSON line of run statistics on stderr at the end.")
@click.option("--rebuild-store", is_flag=True, help="Convert the checkpoint again even if a store exists.")
@click.option("--threads", "-t", type=click.IntRange(min=1), default=None, help="CPU threads for compute.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence (benchmarks).")
@click.option("--plan", "plan_only", is_flag=True, help="Print the placement plan and predicted speed; run nothing.")
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a Chrome/Perfetto trace of every read, copy and kernel to this file.")
@click.option("--config", "config_file", default=None,
              help="A TOML preset (file path, or the name of one in configs/, e.g. cpu-nvme).")
@click.option("--prefetch-depth", type=click.IntRange(min=1), default=None,
              help="Streamed layers in flight (default: the planner chooses).")
@click.option("--ctx-size", "-c", type=click.IntRange(min=16), default=None,
              help="Context window in tokens, prompt and answer together; the KV cache is budgeted for it "
                   "(default: the model's, at most 4096).")
@click.option("--kv-cpu-mem", default=None,
              help="Host RAM for the KV cache (part of --cpu-mem); past it KV chunks spill to --offload-dir. "
                   "Default: the whole context's KV in RAM.")
@click.option("--attention", type=click.Choice(["auto", "exact", "magicpig", "select"]), default="auto",
              show_default=True,
              help="Decode attention over long contexts: exact; MagicPIG LSH sampling; select: with the KV spilled "
                   "to disk, read only the disk chunks whose key bounds say they may matter (exact reads them all). "
                   "auto: MagicPIG past a context length where it pays when the KV is in RAM, select when it spills.")
@click.option("--kv-select-share", type=click.FloatRange(0.0, 1.0, min_open=True), default=KV_SELECT_SHARE,
              show_default=True,
              help="--attention select: at most this share of a layer's disk chunks read per decode step.")
@click.option("--lsh-k", type=click.IntRange(1, 15), default=10, show_default=True, help="MagicPIG: bits per table.")
@click.option("--lsh-l", type=click.IntRange(2, 1024), default=150, show_default=True, help="MagicPIG: hash tables.")
@click.option("--draft", default=None,
              help="Speculative decoding (SpecExec): a small model with the target's tokenizer (a checkpoint "
                   "directory or .gguf), or 'self-int4' (the target's own weights in int4), kept resident; it "
                   "guesses a tree of tokens that one pass of the target verifies. Same output as without.")
@click.option("--spec-budget", type=int, default=None,
              help="Tree nodes verified per target pass with --draft (8-1024; default: the planner chooses).")
@click.option("--expert-slots", type=click.IntRange(min=1), default=None,
              help="Mixture-of-Experts: at most this many routed experts per layer cached in RAM (default: as many "
                   "as --cpu-mem leaves after the always-needed weights); the rest are read from disk when routed.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def run_command(model, prompt, prompt_file, max_new_tokens, temperature, top_p, top_k, seed, dtype, weights, device,
                gpu_mem, cpu_mem, offload_dir, raw, stop, stats, rebuild_store, threads, ignore_eos, plan_only,
                profile, config_file, prefetch_depth, ctx_size, kv_cpu_mem, attention, kv_select_share, lsh_k, lsh_l,
                draft, spec_budget, expert_slots, debug):
    """Run MODEL (a Hugging Face checkpoint directory or a .gguf file; default: SmolLM2-135M-Instruct).

    With --prompt/--prompt-file or piped stdin: answer once, streaming to stdout.
    With a terminal on stdin: a chat REPL.
    """
    cfg = None
    try:
        if prompt is not None and prompt_file is not None:
            raise UsageError("give either --prompt or --prompt-file, not both")
        if prompt_file is not None:
            try:
                prompt = _decoded(prompt_file.read_bytes(), f"--prompt-file {prompt_file}", "utf-8")
            except OSError as e:
                raise UsageError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
        elif prompt is not None:
            prompt = _decoded(prompt, "--prompt")  # argv bytes that are not UTF-8 arrive as lone surrogates
        cfg = RunConfig(
            model=model,
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            dtype=dtype,
            weights=weights,
            device=device,
            gpu_mem=parse_size(gpu_mem, option="--gpu-mem"),
            cpu_mem=parse_size(cpu_mem, option="--cpu-mem"),
            offload_dir=offload_dir,
            raw=raw,
            stop=tuple(stop),
            rebuild_store=rebuild_store,
            threads=threads,
            ignore_eos=ignore_eos,
            profile=profile,
            prefetch_depth=prefetch_depth,
            ctx_size=ctx_size,
            kv_cpu_mem=_kv_cpu_mem(kv_cpu_mem),
            attention=attention,
            kv_select_share=kv_select_share,
            lsh_k=lsh_k,
            lsh_l=lsh_l,
            draft=_draft(draft),
            spec_budget=_spec_budget(spec_budget, draft),
            expert_slots=expert_slots,
            progress=_is_terminal(sys.stderr),  # progress bars only where they can be redrawn in place
        )
        if config_file is not None:
            from offload_rt.presets import apply_preset

            cfg = apply_preset(cfg, config_file, given=_given_options())
        interactive = prompt is None and sys.stdin.isatty() and not plan_only
        if prompt is None and not interactive and not plan_only:
            prompt = _read_stdin()
            if not prompt.strip():
                raise UsageError("no prompt: pass --prompt TEXT, --prompt-file F, pipe text on stdin, or run in a terminal for chat")
        if prompt is not None and not raw and (prompt_file is not None or not interactive):
            prompt = prompt.strip("\n")  # the file's/pipe's final newline is not part of the question
        from offload_rt import app

        code = app.main(cfg, prompt=prompt, interactive=interactive, stats=stats, plan_only=plan_only)
    except _user_errors() as e:  # (evaluated when an exception arrives: storage is imported by then)
        _fail(str(e), debug)
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _is_gpu_oom(e):
            raise
        _fail(_gpu_oom_message(e), debug)
    except BrokenPipeError:
        _reader_left()
    except OSError as e:  # I/O the user can act on: a full or read-only disk, permissions
        _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}; "
              "check the free space and permissions of --offload-dir", debug)
    except KeyboardInterrupt:
        if debug:
            raise
        print("offload-run: interrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        _fail("out of memory; lower --cpu-mem/--gpu-mem so more streams from disk, or use a smaller --dtype", debug)
    except OSError as e:
        if not _is_unwritable(e):
            raise
        _fail(_unwritable_message(e, cfg.store_dir if cfg is not None else None), debug)
    sys.exit(code)


def _decoded(text: str | bytes, what: str, encoding: str = "utf-8") -> str:
    """User input as text the tokenizer takes: undecodable bytes become U+FFFD, said in one warning line."""
    from offload_rt.tokenizer import decode_input, scrub_undecodable

    text, bad = decode_input(text, encoding) if isinstance(text, bytes) else scrub_undecodable(text)
    if bad:
        print(f"offload-run: warning: {what} is not valid {encoding.upper().replace('_', '-')}: {bad} byte"
              f"{'s' if bad > 1 else ''} replaced with U+FFFD (convert the text first, e.g. iconv -f latin1 -t utf-8)",
              file=sys.stderr)
    return text


def _read_stdin() -> str:
    """All of piped stdin, decoded by us (Python's own decoding would pass undecodable bytes on as surrogates)."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # stdin replaced by a text-only stream (embedded use)
        return _decoded(sys.stdin.read(), "stdin")
    return _decoded(raw.read(), "stdin", sys.stdin.encoding or "utf-8")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)


def _is_unwritable(e: OSError) -> bool:
    """A file access refused by a read-only filesystem or by permissions: the user's setup, not a bug."""
    return e.errno in _REFUSED and e.filename is not None


def _unwritable_message(e: OSError, store_dir: Path | None) -> str:
    """One line for a refused access; in the offload dir, say that it must be writable (not "free space")."""
    where = Path(os.fsdecode(e.filename))
    try:
        inside = store_dir is not None and where.resolve().is_relative_to(Path(store_dir).expanduser().resolve())
    except (OSError, ValueError):
        inside = False
    if inside:
        what = "not writable" if e.errno == errno.EROFS else "not accessible"
        return (f"the offload dir {store_dir} is {what} ({e.strerror}): a run writes there (the first run's disk "
                "measurement, a converted store, KV spill); choose a writable --offload-dir")
    return f"cannot access {where}: {e.strerror}"


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can fix: ours, and the storage layer's own (storage must not depend on offload_rt).

    storage's are looked up only once it has been imported (it imports torch: ``--help`` stays fast);
    before that, none of its errors can have been raised.
    """
    errors = sys.modules.get("storage.errors")
    return (UserError, errors.StorageError) if errors is not None else (UserError,)


def _is_gpu_oom(e: BaseException) -> bool:
    """torch's out-of-memory error (``torch.OutOfMemoryError``, the same class as
    ``torch.cuda.OutOfMemoryError``), or a CUDA call that failed for memory outside the
    caching allocator (cuBLAS handle or workspace, a kernel module loaded lazily)."""
    torch = sys.modules.get("torch")  # no torch imported: no torch error either
    if torch is None:
        return False
    oom = tuple(c for c in (getattr(torch, "OutOfMemoryError", None),
                            getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if isinstance(c, type))
    if oom and isinstance(e, oom):
        return True
    text = str(e)
    return "CUDA error: out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text


def _gpu_oom_message(e: BaseException) -> str:
    """One line: what failed (the size torch tried to allocate, when it says) and what to change."""
    import re

    m = re.search(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)", str(e))
    what = f" (tried to allocate {m.group(1)})" if m else ""
    return (f"out of GPU memory{what}; lower --gpu-mem so more stays in host RAM, "
            "or use a smaller --ctx-size or --dtype")


def _reader_left() -> None:
    """stdout's reader went away (``offload-run ... | head``): stop quietly, exit 0.

    stdout now points at /dev/null so the interpreter's final flush of what is still buffered
    does not fail a second time (and print a traceback) on the way out.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no real file (embedded use): nothing will flush to it
        pass
    sys.exit(0)


def _given_options() -> set[str]:
    """Options the user typed (a preset fills in only the others)."""
    ctx = click.get_current_context()
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)}


def main(argv: list[str] | None = None) -> None:
    """Console entry point; click's own usage errors are also reduced to one line, exit 2."""
    from offload_rt.threads import configure_process

    configure_process()  # before torch/numba load OpenMP: idle workers must not spin on a shared CPU
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        run_command.main(args=argv, prog_name="offload-run", standalone_mode=False)
    except click.exceptions.NoSuchOption as e:
        _fail(f"{e.format_message()} (see offload-run --help)", debug)
    except click.UsageError as e:
        _fail(f"{e.format_message()} (see offload-run --help)", debug)
    except click.exceptions.Abort:
        sys.exit(130)
    except BrokenPipeError:
        _reader_left()


def report_main() -> None:
    """``offload-report``: the profiling report of a ``--profile`` trace (``python -m tools.report`` in a checkout)."""
    from tools.report import main as report

    sys.exit(report())


if __name__ == "__main__":
    main()
