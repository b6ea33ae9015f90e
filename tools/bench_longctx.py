"""End to end at a long context: decode tok/s of the default model with the KV in RAM vs mostly on disk,
exact vs MagicPIG attention vs selective disk reads, and the share of each token's time spent in attention
(issues 10, 22).

    python -m tools.bench_longctx [--tokens 6000] [-n 32] [--kv-cpu-mem 64M] [--memcap 2500M] [--json PATH]
                                  [--kv-dtypes default,q8,q4]

``--kv-dtypes``: every case once per ``--kv-dtype`` (``default``: the option left out, the compute dtype),
side by side in the same run (the quantized KV's disk bytes per token in the ``disk read/step`` column).

Each case is one ``python -m offload_rt`` process, run as a user would: a passkey prompt of about
``--tokens`` tokens (tests/passkey_prompts.py, the needle at half depth) from a file, ``--raw``,
greedy, ``--ignore-eos``, ``--ctx-size 8192``, ``--stats``:

* ``ram exact``       every KV chunk in RAM, the Numba exact kernel;
* ``ram magicpig``    the same with ``--attention magicpig`` (sinks + recent window exact, the rest sampled);
* ``disk exact``      ``--kv-cpu-mem`` far below the context's KV: most chunks spill to the zarr store
                      and every decode step reads them back (O_DIRECT, staged while the previous batch computes);
* ``disk magicpig``   refused by the plan (MagicPIG samples from chunks in RAM): shown with its message;
* ``disk select``     ``--attention select`` (what ``auto`` runs once the KV spills): each decode step reads
                      only the disk chunks whose key bounds say they may matter, at most ``--kv-select-share``
                      of them (offload_rt/memory/kv_select.py).

Figures per case, from the ``--stats`` line: decode tok/s as the CLI reports it (the first token comes
from the prefill's logits, so ``n - 1`` decode steps), attention share = ``attention_s / decode_s``,
the KV bytes per tier at the end, peak RSS, the decode thread count the tuner settled on (a shared
machine moves it, and tok/s with it), and whether the answer holds the key. The first decode step
is not like the others (MagicPIG hashes the whole prompt into its tables there) and the stats count KV
disk reads over the whole run, prefill included; so each case runs a second time with ``-n 2`` (one
decode step) and the difference gives steps 2..n: steady tok/s, steady attention share, KV bytes read
from disk per step; ``first step s`` is the ``-n 2`` run's decode time. ``disk chunks read``: of the
disk chunks decode's attention covered (summed over layers and steps), those it read.

``--memcap SIZE`` runs every case under ``memcap SIZE --cold --`` (the shared tool: a memory cgroup
that charges the page cache too, caches dropped first), so disk figures are reads from the device and
not from a page cache holding the spilled chunks; a run killed at the cap is a row saying so, and
the cap's peak is in the JSON. The cap must hold the whole process (weights, KV, MagicPIG tables,
transients): pick it from the runs' peak RSS. Cases run one after another; these machines are
shared, so rerun when the load is high (the attention share moves less than tok/s).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.passkey_prompts import FILLER_TOKENS, passkey_text

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
KEY = 71432
CASES = (("ram", "exact"), ("ram", "magicpig"), ("disk", "exact"), ("disk", "magicpig"), ("disk", "select"))
PROMPT_OVERHEAD = 60  # tokens of the intro, needle and question around the filler


def memcap_tool() -> str:
    return shutil.which("memcap") or "/work/shared/bin/memcap"


def cli_command(prompt_file: Path, *, n: int, attention: str, kv_cpu_mem: str | None, ctx_size: int,
                offload_dir: Path | None, memcap: str | None, select_share: float | None = None,
                kv_dtype: str = "default") -> list[str]:
    cmd = [sys.executable, "-m", "offload_rt", "--raw", "--prompt-file", str(prompt_file), "-n", str(n),
           "--ignore-eos", "--ctx-size", str(ctx_size), "--stats", "--attention", attention]
    if kv_dtype != "default":
        cmd += ["--kv-dtype", kv_dtype]
    if kv_cpu_mem:
        cmd += ["--kv-cpu-mem", kv_cpu_mem]
    if select_share is not None:
        cmd += ["--kv-select-share", str(select_share)]
    if offload_dir:
        cmd += ["--offload-dir", str(offload_dir)]
    return [memcap_tool(), memcap, "--cold", "--", *cmd] if memcap else cmd


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def stats_line(stderr: str) -> dict:
    """The --stats JSON line: the last line that is a JSON object (memcap prints its own line after it)."""
    for line in reversed(stderr.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise RuntimeError(f"no --stats line in:\n{stderr[-3000:]}")


def memcap_peak(stderr: str) -> int | None:
    m = re.search(r"^memcap: cap=\d+ peak=(\d+)", stderr, re.M)
    return int(m.group(1)) if m else None


def _outcome(p: subprocess.CompletedProcess, what: str, memcap: str | None) -> dict | None:
    """None for a run that worked; else the row's reason: refused by the plan (a user error, exit 2, before
    any work), or killed at the memory cap."""
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("memcap:")]
    if p.returncode == 0:
        return None
    if p.returncode == 2:
        return {"refused": lines[-1] if lines else p.stderr.strip()}
    if memcap and p.returncode in (137, -9):
        return {"killed": f"killed at memcap {memcap} (peak {_mib(memcap_peak(p.stderr))})"}
    raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")


def measure(storage: str, attention: str, prompt_file: Path, a, kv_dtype: str = "default") -> dict:
    """One case: two CLI runs, ``-n N`` and ``-n 2`` (one decode step), over the same prompt → one row."""
    kv_mem = a.kv_cpu_mem if storage == "disk" else None
    share = a.select_share if attention == "select" else None
    opts = dict(attention=attention, kv_cpu_mem=kv_mem, ctx_size=a.ctx_size, offload_dir=a.offload_dir,
                memcap=a.memcap, select_share=share, kv_dtype=kv_dtype)
    case = (f"{storage} {attention}" + (f" {share:g}" if share is not None else "")
            + (f" kv {kv_dtype}" if kv_dtype != "default" else ""))
    cmd = cli_command(prompt_file, n=a.n, **opts)
    row: dict = {"case": case, "command": " ".join(cmd)}
    p = run(cmd, a.timeout)
    failed = _outcome(p, case, a.memcap)
    if failed:
        return {**row, **failed}
    rec = stats_line(p.stderr)
    kv = rec["kv_bytes_by_tier"]
    row.update(prompt_tokens=rec["prompt_tokens"], new_tokens=rec["new_tokens"], prefill_s=rec["prefill_s"],
               decode_s=rec["decode_s"], decode_tok_s=rec["decode_tok_s"], attention_s=rec["attention_s"],
               attention_share=rec["attention_s"] / rec["decode_s"] if rec["decode_s"] else None,
               kv_host_bytes=kv.get("host", 0), kv_disk_bytes=kv.get("disk", 0),
               kv_disk_read_bytes=rec["kv_disk_read_bytes"], peak_rss_bytes=rec["peak_rss_bytes"],
               memcap_peak_bytes=memcap_peak(p.stderr), decode_threads=rec.get("decode_threads"),
               kv_disk_chunks_decode=rec.get("kv_disk_chunks_decode"),
               answer=p.stdout.strip(), found=str(KEY) in p.stdout)
    # Steps 2..N without the first decode step (MagicPIG builds its tables there) nor the prefill's disk reads:
    # the same run cut at one decode step, subtracted.
    steps = rec["new_tokens"] - 2
    p2 = run(cli_command(prompt_file, n=2, **opts), a.timeout)
    if steps > 0 and not _outcome(p2, f"{case} (-n 2)", a.memcap):
        r2 = stats_line(p2.stderr)
        dt = rec["decode_s"] - r2["decode_s"]
        row.update(first_step_s=r2["decode_s"], steady_tok_s=steps / dt if dt > 0 else None,
                   steady_attention_share=(rec["attention_s"] - r2["attention_s"]) / dt if dt > 0 else None,
                   kv_disk_read_per_step_bytes=(rec["kv_disk_read_bytes"] - r2["kv_disk_read_bytes"]) / steps)
    return row


def _mib(n) -> str:
    return "—" if n is None else f"{n / MiB:.1f} MiB"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _chunks(c: dict | None) -> str:
    """Disk chunks decode read / those its attention covered (summed over layers and steps)."""
    if not c or not c.get("spilled"):
        return "—"
    return f"{c['read']} / {c['spilled']} ({100 * c['read'] / c['spilled']:.0f}%)"


def _num(x, fmt: str = ".2f") -> str:
    return "—" if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    out = ["| case | decode tok/s | attention share | steady tok/s (steps 2..n) | steady attention share | "
           "first step s | KV host | KV disk | disk read/step | disk chunks read | peak RSS | decode threads | "
           "key found |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        why = r.get("refused") or r.get("killed")
        if why:
            out.append(f"| {r['case']} | {'refused' if 'refused' in r else 'killed'}: {why} |" + " |" * 11)
            continue
        out.append(f"| {r['case']} | {r['decode_tok_s']:.2f} | {_pct(r['attention_share'])} | "
                   f"{_num(r.get('steady_tok_s'))} | {_pct(r.get('steady_attention_share'))} | "
                   f"{_num(r.get('first_step_s'), '.3f')} | {_mib(r['kv_host_bytes'])} | {_mib(r['kv_disk_bytes'])} | "
                   f"{_mib(r.get('kv_disk_read_per_step_bytes'))} | {_chunks(r.get('kv_disk_chunks_decode'))} | "
                   f"{_mib(r['peak_rss_bytes'])} | "
                   f"{r.get('decode_threads') or '—'} | {'yes' if r['found'] else 'no'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_longctx", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=6000, help="prompt length (about)")
    ap.add_argument("-n", type=int, default=32, help="new tokens per run (greedy, --ignore-eos)")
    ap.add_argument("--ctx-size", type=int, default=8192)
    ap.add_argument("--kv-cpu-mem", default="64M", help="the disk cases' --kv-cpu-mem (far below the KV)")
    ap.add_argument("--select-share", type=float, default=None,
                    help="the select case's --kv-select-share (default: the CLI's)")
    ap.add_argument("--memcap", default=None, help="run each case under `memcap SIZE --cold --` (e.g. 1500M)")
    ap.add_argument("--offload-dir", type=Path, default=None, help="stores and the spilled KV (default: the CLI's)")
    ap.add_argument("--cases", default=",".join(f"{s}-{a}" for s, a in CASES),
                    help="comma-separated storage-attention pairs")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per CLI run")
    ap.add_argument("--json", dest="json_path", type=Path, help="also write the rows here")
    ap.add_argument("--kv-dtypes", default="default", help="comma-separated --kv-dtype values, each case per value")
    a = ap.parse_args(argv)
    cases = [tuple(c.split("-", 1)) for c in a.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {[f'{s}-{t}' for s, t in CASES]}")
    n_filler = max(1, (a.tokens - PROMPT_OVERHEAD) // FILLER_TOKENS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_longctx-") as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_text(passkey_text(KEY, n_filler, 0.5))
        for storage, attention in cases:
            for kv_dtype in a.kv_dtypes.split(","):
                rows.append(measure(storage, attention, prompt_file, a, kv_dtype))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            if a.json_path:  # rewritten after each case: a run cut short keeps what it had
                a.json_path.write_text(json.dumps({"tokens": a.tokens, "n": a.n, "memcap": a.memcap,
                                                   "kv_cpu_mem": a.kv_cpu_mem, "rows": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
