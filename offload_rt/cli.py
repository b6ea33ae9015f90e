"""``offload-run``: thin click commands that build a RunConfig and call the library.

``offload-run [MODEL] [options]`` runs a model, as it always has; a first argument that is one of
SUBCOMMANDS (``serve``, ``list``, ``rm``, ``prune``) runs that command instead (:func:`main`).
``serve`` takes the run's model options (MODEL_OPTIONS, one RunConfig built by :func:`run_config`);
``list``/``rm``/``prune`` live in offload_rt/cli_stores.py. Every command reports errors through
:func:`reported`: one stderr line, exit status 2.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from offload_rt.config import KV_DTYPES, KV_SELECT_SHARE, RunConfig, SamplingConfig, parse_size
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


CONTEXT = {"help_option_names": ["-h", "--help"]}
SUBCOMMANDS = ("serve", "list", "rm", "prune")  # offload-run's first argument picks one; anything else runs a model


def _options(decorators: list):
    """Apply click option decorators in the order listed (the first shows first in --help)."""
    def apply(f):
        for decorate in reversed(decorators):
            f = decorate(f)
        return f
    return apply


OFFLOAD_DIR = click.option("--offload-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                           help="Where converted weight stores live (the disk tier). Default: "
                                "~/.cache/offload_rt/stores.")
DEBUG = click.option("--debug", is_flag=True, help="Show tracebacks.")

# The options of a model run, shared by `offload-run MODEL` and `offload-run serve`: how the model is opened,
# placed and sampled (serve: the defaults of its requests).
MODEL_OPTIONS = [
    click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=256, show_default=True),
    click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy."),
    click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True),
    click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off."),
    click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output)."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                 help="Compute dtype (default: the checkpoint's; float32 for GGUF)."),
    click.option("--weights", type=click.Choice(["auto", "bf16", "f16", "f32", "int8", "int4"]), default="auto",
                 show_default=True,
                 help="Stored weight format: auto keeps the source's (GGUF quants stay quantized); int8/int4 "
                      "quantize the matrices at conversion (group-wise, 32 per group); a float type stores every "
                      "tensor in it."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
    click.option("--gpu-mem", default=None, help="GPU memory budget: 8G, 512M, 0, auto."),
    click.option("--cpu-mem", default=None, help="Host RAM budget for weights/KV: 16G, auto."),
    OFFLOAD_DIR,
    click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template."),
    click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    click.option("--rebuild-store", is_flag=True, help="Convert the checkpoint again even if a store exists."),
    click.option("--threads", "-t", type=click.IntRange(min=1), default=None, help="CPU threads for compute."),
    click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence (benchmarks)."),
    click.option("--plan", "plan_only", is_flag=True, help="Print the placement plan and predicted speed; run nothing."),
    click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Write a Chrome/Perfetto trace of every read, copy and kernel to this file."),
    click.option("--config", "config_file", default=None,
                 help="A TOML preset (file path, or the name of one in configs/, e.g. cpu-nvme)."),
    click.option("--prefetch-depth", type=click.IntRange(min=1), default=None,
                 help="Streamed layers in flight (default: the planner chooses)."),
    click.option("--ctx-size", "-c", type=click.IntRange(min=16), default=None,
                 help="Context window in tokens, prompt and answer together; the KV cache is budgeted for it "
                      "(default: the model's, at most 4096)."),
    click.option("--kv-cpu-mem", default=None,
                 help="Host RAM for the KV cache (part of --cpu-mem); past it KV chunks spill to --offload-dir. "
                      "Default: the whole context's KV in RAM."),
    click.option("--kv-dtype", type=click.Choice(list(KV_DTYPES)), default=None,
                 help="How the KV cache is held in RAM and on disk: f16, bf16, or q8/q4 (closed 256-token chunks "
                      "quantized, keys per channel over 32 tokens and values per token, the newest chunk in "
                      "floats). Default: the compute dtype."),
    click.option("--attention", type=click.Choice(["auto", "exact", "magicpig", "select"]), default="auto",
                 show_default=True,
                 help="Decode attention over long contexts: exact; MagicPIG LSH sampling; select: with the KV spilled "
                      "to disk, read only the disk chunks whose key bounds say they may matter (exact reads them "
                      "all). auto: MagicPIG past a context length where it pays when the KV is in RAM, select when "
                      "it spills."),
    click.option("--kv-select-share", type=click.FloatRange(0.0, 1.0, min_open=True), default=KV_SELECT_SHARE,
                 show_default=True,
                 help="--attention select: at most this share of a layer's disk chunks read per decode step."),
    click.option("--lsh-k", type=click.IntRange(1, 15), default=10, show_default=True,
                 help="MagicPIG: bits per table."),
    click.option("--lsh-l", type=click.IntRange(2, 1024), default=150, show_default=True,
                 help="MagicPIG: hash tables."),
    click.option("--draft", default=None,
                 help="Speculative decoding (SpecExec): a small model with the target's tokenizer (a checkpoint "
                      "directory or .gguf), or 'self-int4' (the target's own weights in int4), kept resident; it "
                      "guesses a tree of tokens that one pass of the target verifies. Same output as without."),
    click.option("--spec-budget", type=int, default=None,
                 help="Tree nodes verified per target pass with --draft (8-1024; default: the planner chooses)."),
    click.option("--spec-overlap/--no-spec-overlap", default=False, show_default=True,
                 help="With --draft: the draft grows on (towards the next tree) while the target verifies the "
                      "current one, on a second thread. Same output either way."),
    click.option("--expert-slots", type=click.IntRange(min=1), default=None,
                 help="Mixture-of-Experts: at most this many routed experts per layer cached in RAM (default: as "
                      "many as --cpu-mem leaves after the always-needed weights); the rest are read from disk when "
                      "routed."),
    DEBUG,
]


def run_config(model, *, temperature, top_p, top_k, seed, gpu_mem, cpu_mem, stop, kv_cpu_mem, draft, spec_budget,
               config_file, **fields) -> RunConfig:
    """The RunConfig of the MODEL_OPTIONS as click parsed them: the options that need parsing or checking
    by name, ``fields`` (the rest, and serve's ``parallel``) as the RunConfig fields they are named after;
    a ``--config`` preset fills in what the command line left out. UsageError for a bad value."""
    if fields.get("spec_overlap") and draft is None:
        raise UsageError("--spec-overlap grows the tree of --draft during the target's pass; pass --draft too "
                         "(e.g. --draft self-int4)")
    cfg = RunConfig(
        model=model,
        sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        gpu_mem=parse_size(gpu_mem, option="--gpu-mem"),
        cpu_mem=parse_size(cpu_mem, option="--cpu-mem"),
        stop=tuple(stop),
        kv_cpu_mem=_kv_cpu_mem(kv_cpu_mem),
        draft=_draft(draft),
        spec_budget=_spec_budget(spec_budget, draft),
        progress=_is_terminal(sys.stderr),  # progress bars only where they can be redrawn in place
        **fields,
    )
    if config_file is not None:
        from offload_rt.presets import apply_preset

        cfg = apply_preset(cfg, config_file, given=_given_options())
    return cfg


@contextmanager
def reported(debug: bool, store_dir=lambda: None):
    """Run the body; what a user can act on ends it as one stderr line and exit status 2 (``debug``: the
    traceback), Ctrl-C as exit 130, a reader that left stdout as exit 0. ``store_dir()``: the store
    directory once known (a refused access inside it is said to be the offload dir's)."""
    try:
        yield
    except _user_errors() as e:  # (evaluated when an exception arrives: storage is imported by then)
        _fail(str(e), debug)
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _is_gpu_oom(e):
            raise
        _fail(_gpu_oom_message(e), debug)
    except BrokenPipeError:
        _reader_left()
    except OSError as e:  # I/O the user can act on: a full or read-only disk, permissions
        if _is_unwritable(e):
            _fail(_unwritable_message(e, store_dir()), debug)
        _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}; "
              "check the free space and permissions of --offload-dir", debug)
    except KeyboardInterrupt:
        if debug:
            raise
        print("offload-run: interrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        _fail("out of memory; lower --cpu-mem/--gpu-mem so more streams from disk, or use a smaller --dtype", debug)


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="offload_rt", prog_name="offload-run", message="%(prog)s %(version)s")
@click.argument("model", required=False)
@click.option("--prompt", "-p", help="Answer this prompt and exit.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), help="Read the prompt from a file.")
@click.option("--stats", is_flag=True, help="Print one JSON line of run statistics on stderr at the end.")
@_options(MODEL_OPTIONS)
def run_command(model, prompt, prompt_file, stats, plan_only, debug, **options):
    """Run MODEL (a Hugging Face checkpoint directory or a .gguf file; default: SmolLM2-135M-Instruct).

    With --prompt/--prompt-file or piped stdin: answer once, streaming to stdout.
    With a terminal on stdin: a chat REPL.

    \b
    Subcommands (offload-run COMMAND --help for each):
      offload-run serve [MODEL] [options]  an OpenAI-compatible HTTP server
      offload-run list                     the converted weight stores: source, format, size, last use
      offload-run rm NAME                  remove a weight store
      offload-run prune                    remove stale stores and what dead runs left
    A model whose path is one of these words runs as ./serve (./list, ...).
    """
    cfg = None
    with reported(debug, lambda: cfg.store_dir if cfg is not None else None):
        if prompt is not None and prompt_file is not None:
            raise UsageError("give either --prompt or --prompt-file, not both")
        if prompt_file is not None:
            try:
                prompt = _decoded(prompt_file.read_bytes(), f"--prompt-file {prompt_file}", "utf-8")
            except OSError as e:
                raise UsageError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
        elif prompt is not None:
            prompt = _decoded(prompt, "--prompt")  # argv bytes that are not UTF-8 arrive as lone surrogates
        cfg = run_config(model, **options)
        interactive = prompt is None and sys.stdin.isatty() and not plan_only
        if prompt is None and not interactive and not plan_only:
            prompt = _read_stdin()
            if not prompt.strip():
                raise UsageError("no prompt: pass --prompt TEXT, --prompt-file F, pipe text on stdin, or run in a terminal for chat")
        if prompt is not None and not options["raw"] and (prompt_file is not None or not interactive):
            prompt = prompt.strip("\n")  # the file's/pipe's final newline is not part of the question
        from offload_rt import app

        code = app.main(cfg, prompt=prompt, interactive=interactive, stats=stats, plan_only=plan_only)
    sys.exit(code)


@click.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; mind --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port; the one taken is printed when ready).")
@click.option("--api-key", envvar="OFFLOAD_RT_API_KEY", default=None,
              help="Answer only requests carrying 'Authorization: Bearer KEY' (default: $OFFLOAD_RT_API_KEY, "
                   "which ps does not show; neither: no key needed).")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="Requests decoded together (continuous batching; default: the planner chooses).")
@click.option("--queue-depth", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a free sequence beyond --parallel; past it, 503 with Retry-After.")
@_options(MODEL_OPTIONS)
def serve_command(model, host, port, api_key, parallel, queue_depth, plan_only, debug, **options):
    """Serve MODEL over HTTP with an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models, /health, /metrics), several requests decoded together.

    --temperature, --top-p, --seed, --max-new-tokens and --stop, when given, are the defaults of requests
    that leave those fields out (else OpenAI's: temperature 1, top_p 1, up to the end of the context).
    --plan prints the placement plan, with the sequences decoded in parallel, and exits.
    """
    cfg = None
    given = _given_options()
    with reported(debug, lambda: cfg.store_dir if cfg is not None else None):
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key is empty; give a key, or leave the option out to serve without one")
        cfg = run_config(model, parallel=parallel, **options)
        from offload_rt import serve

        code = serve.main(cfg, host=host, port=port, api_key=api_key, queue_depth=queue_depth, plan_only=plan_only,
                          defaults=_request_defaults(cfg, given))
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


def _request_defaults(cfg: RunConfig, given: set[str]) -> dict:
    """The request fields ``serve``'s given options stand for when a request leaves them out."""
    s = cfg.sampling
    fields = {"temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "max_new_tokens": cfg.max_new_tokens,
              "stop": list(cfg.stop)}
    names = {"max_new_tokens": "max_tokens"}
    return {names.get(k, k): v for k, v in fields.items() if k in given}


def _given_options() -> set[str]:
    """Options the user typed (a preset fills in only the others)."""
    ctx = click.get_current_context()
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)}


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a first argument in SUBCOMMANDS runs that command, anything else the run command;
    click's own usage errors are also reduced to one line, exit 2."""
    from offload_rt.threads import configure_process

    configure_process()  # before torch/numba load OpenMP: idle workers must not spin on a shared CPU
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    name = args[0] if args and args[0] in SUBCOMMANDS else None
    prog = "offload-run" if name is None else f"offload-run {name}"
    try:
        _command(name).main(args=args if name is None else args[1:], prog_name=prog, standalone_mode=False)
    except click.UsageError as e:
        _fail(f"{e.format_message()} (see {prog} --help)", debug)
    except click.exceptions.Abort:
        sys.exit(130)
    except BrokenPipeError:
        _reader_left()


def _command(name: str | None) -> click.Command:
    """The click command for a subcommand's ``name``; None: the run command."""
    if name is None:
        return run_command
    if name == "serve":
        return serve_command
    from offload_rt.cli_stores import COMMANDS

    return COMMANDS[name]


def report_main() -> None:
    """``offload-report``: the profiling report of a ``--profile`` trace (``python -m tools.report`` in a checkout)."""
    from tools.report import main as report

    sys.exit(report())


if __name__ == "__main__":
    main()
