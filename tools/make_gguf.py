"""Write a llama.cpp GGUF of a Hugging Face checkpoint, quantized the way llama.cpp users get one.

    python -m tools.make_gguf HF_DIR OUT.gguf [--type Q4_0] [--llama-python /tmp/llvenv/bin/python]

The baseline's own tools do the work, so the file is what a llama.cpp user would have: the HF →
GGUF converter vendored in the llama-cpp-python sdist (``vendor/llama.cpp/convert_hf_to_gguf.py``
with its ``gguf-py``) writes a bf16 GGUF, then ``llama_cpp.llama_model_quantize`` quantizes it
(llama.cpp's default choices per tensor: with Q4_0 the output matrix becomes Q6_K), the bf16
intermediate is deleted, and llama.cpp loads the result and greedily decodes a few tokens as a check.

Everything llama.cpp runs in ``--llama-python``, an interpreter with ``llama_cpp`` (not a project
dependency: its build takes minutes). The converter also needs torch, transformers, sentencepiece
and protobuf in that interpreter, or runs in ``--convert-python`` (e.g. the project's own venv, which
has them; the converter still imports llama.cpp's vendored gguf-py, not ours). Mixture-of-Experts
checkpoints convert the same way (the converter stacks per-expert tensors into ``*_exps``). When no unpacked sdist is found (``--llama-src``, then
``$LLAMA_CPP_SRC``, then ``/tmp/llsdist/*/vendor/llama.cpp``, then ``WORK/llsdist``), the sdist of
the installed llama-cpp-python version is fetched with that interpreter's pip into ``WORK/llsdist``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

DEFAULT_LLAMA_PYTHON = "/tmp/llvenv/bin/python"

# Run by --llama-python: quantize argv[1] into argv[2] as LLAMA_FTYPE_MOSTLY_<argv[3]>.
QUANTIZE_SCRIPT = r"""
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""

# Run by --llama-python: load argv[1], greedy-decode 8 tokens, print them as JSON.
CHECK_SCRIPT = r"""
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, n_ctx=256, verbose=False)
out = []
for tok in llm.generate(llm.tokenize(b"Once upon a time"), temp=0.0, top_k=1, reset=True):
    out.append(tok)
    if len(out) >= 8:
        break
print(json.dumps({"tokens": out, "text": llm.detokenize(out).decode(errors="replace")}))
"""


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, **kw)


def llama_version(llama_python: str) -> str:
    p = _run([llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"])
    if p.returncode != 0:
        raise RuntimeError(f"{llama_python} cannot import llama_cpp (pip install llama-cpp-python there):\n"
                           f"{p.stderr[-1500:]}")
    return p.stdout.strip().splitlines()[-1]


def find_llama_src(llama_python: str, work: Path, given: Path | None = None) -> Path:
    """The ``vendor/llama.cpp`` directory of an unpacked llama-cpp-python sdist (fetched when none is found).

    The converter must match the library that will read its output, so a fetched sdist is the
    version installed in ``llama_python``.
    """
    cands = [given] if given else []
    if os.environ.get("LLAMA_CPP_SRC"):
        cands.append(Path(os.environ["LLAMA_CPP_SRC"]))
    cands += sorted(Path("/tmp/llsdist").glob("llama_cpp_python-*/vendor/llama.cpp"))
    cands += sorted((work / "llsdist").glob("llama_cpp_python-*/vendor/llama.cpp"))
    for c in cands:
        if c and (c / "convert_hf_to_gguf.py").is_file():
            return c
    version = llama_version(llama_python)
    dest = work / "llsdist"
    dest.mkdir(parents=True, exist_ok=True)
    p = _run([llama_python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={version}", "-d", dest])
    if p.returncode != 0:
        raise RuntimeError(f"could not download the llama-cpp-python {version} sdist:\n{p.stderr[-1500:]}")
    archive = next(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    src = dest / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{archive} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    return src


def convert_hf(llama_python: str, llama_src: Path, hf_dir: Path, out: Path, outtype: str = "bf16") -> Path:
    """HF checkpoint → unquantized GGUF with llama.cpp's converter (its vendored gguf-py, not ours)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    p = _run([llama_python, llama_src / "convert_hf_to_gguf.py", hf_dir, "--outtype", outtype, "--outfile", out],
             env=env)
    if p.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({p.returncode}); the converter needs torch, "
                           f"transformers, sentencepiece and protobuf in {llama_python}:\n{p.stderr[-2500:]}")
    return out


def quantize(llama_python: str, src: Path, dst: Path, qtype: str = "Q4_0", threads: int = 2) -> Path:
    p = _run([llama_python, "-c", QUANTIZE_SCRIPT, src, dst, qtype, threads])
    if p.returncode != 0 or not dst.is_file():
        raise RuntimeError(f"llama_model_quantize({qtype}) failed ({p.returncode}):\n{p.stderr[-2500:]}")
    return dst


def check_runs(llama_python: str, gguf: Path) -> str:
    """Load ``gguf`` in llama.cpp and decode 8 greedy tokens; returns their text (raises when it fails)."""
    p = _run([llama_python, "-c", CHECK_SCRIPT, gguf])
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp cannot run {gguf} ({p.returncode}):\n{p.stderr[-2500:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    if len(rec["tokens"]) < 8:
        raise RuntimeError(f"llama.cpp produced only {len(rec['tokens'])} tokens from {gguf}")
    return rec["text"]


def make_gguf(hf_dir: Path, out: Path, *, qtype: str = "Q4_0", llama_python: str = DEFAULT_LLAMA_PYTHON,
              work: Path | None = None, llama_src: Path | None = None, threads: int = 2,
              convert_python: str | None = None) -> Path:
    """Write ``out`` (atomically) from ``hf_dir``; the bf16 intermediate lives beside it only meanwhile.

    ``convert_python``: the interpreter of the HF → GGUF converter (default ``llama_python``)."""
    out = Path(out)
    work = Path(work) if work else out.parent
    src = find_llama_src(llama_python, work, llama_src)
    full = out.with_name(out.name + ".bf16.tmp")
    part = out.with_name(out.name + ".tmp")
    try:
        convert_hf(convert_python or llama_python, src, Path(hf_dir), full)
        quantize(llama_python, full, part, qtype, threads)
    finally:
        full.unlink(missing_ok=True)
    text = check_runs(llama_python, part)
    os.replace(part, out)
    print(f"{out}: {out.stat().st_size / 1e9:.2f} GB, llama.cpp says {text!r}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--type", default="Q4_0", help="llama.cpp ftype after LLAMA_FTYPE_MOSTLY_ (Q4_0, Q4_K_M, Q8_0, ...)")
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON, help="a Python that can import llama_cpp")
    p.add_argument("--llama-src", type=Path, default=None, help="vendor/llama.cpp of an unpacked llama-cpp-python sdist")
    p.add_argument("--work", type=Path, default=None, help="where a fetched sdist goes (default: beside OUT)")
    p.add_argument("--convert-python", default=None,
                   help="the converter's interpreter (torch, transformers, sentencepiece; default --llama-python)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    make_gguf(a.hf_dir, a.out, qtype=a.type, llama_python=a.llama_python, work=a.work, llama_src=a.llama_src,
              threads=a.threads, convert_python=a.convert_python)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
