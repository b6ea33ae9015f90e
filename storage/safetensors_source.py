"""Reading a Hugging Face checkpoint directory: config.json, *.safetensors headers, the tokenizer files.

Only headers and JSON are parsed here; tensor data is copied by the converter straight from
the byte ranges :meth:`HFSource.tensors` names. Every problem raises ModelSourceError (one line).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

from storage.errors import ModelSourceError
from storage.formats import get_format
from storage.tensor_source import TensorSource, numel as _numel, stat_entry as _stat_entry

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Files of a Hugging Face directory that make up its identity (anything else may change freely).
_HF_IDENTITY_GLOBS = ("config.json", "generation_config.json", "tokenizer*.json", "tokenizer.model",
                      "special_tokens_map.json", "chat_template*", "*.safetensors", "model.safetensors.index.json")




def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """(header dict without ``__metadata__``, data start offset); validates lengths and offsets."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelSourceError(f"{file} is truncated (no safetensors header); re-download or re-export it")
            (n,) = struct.unpack("<Q", raw)
            if n < 2 or n > min(size - 8, 512 << 20):
                raise ModelSourceError(
                    f"{file} has a corrupt safetensors header (header length {n}, file size {size}); "
                    "re-download or re-export it")
            blob = f.read(n)
    except OSError as e:
        raise ModelSourceError(f"cannot read {file}: {e.strerror}; check the path and its permissions") from None
    try:
        header = json.loads(blob.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelSourceError(f"{file} has a corrupt safetensors header (bad JSON: {e}); "
                               "re-download or re-export it") from None
    header.pop("__metadata__", None)
    start = 8 + n
    data_len = size - start
    for name, ent in header.items():
        try:
            b, e = (int(x) for x in ent["data_offsets"])
            shape = [int(s) for s in ent["shape"]]
            dtype = ent["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ModelSourceError(f"{file} has a corrupt safetensors header (bad entry for {name}); "
                                   "re-download or re-export it") from None
        if not (0 <= b <= e <= data_len):
            raise ModelSourceError(f"{file} is truncated or corrupt: tensor {name} lies past the end of the file; "
                                   "re-download or re-export it")
        if dtype in _ST_DTYPES and e - b != _numel(shape) * get_format(_ST_DTYPES[dtype]).block_bytes:
            raise ModelSourceError(f"{file} has a corrupt safetensors header (size of {name} does not match its "
                                   "shape); re-download or re-export it")
    return header, start


def _load_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelSourceError(f"cannot read {file}: {e.strerror}; check the path and its permissions") from None
    except ValueError as e:
        raise ModelSourceError(f"{file} is not valid JSON ({e}); repair or re-download the {what}") from None


def _token_content(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class HFSource:
    kind = "hf"

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def display_name(self) -> str:
        return self.path.resolve().name

    def _files(self) -> list[Path]:
        seen: dict[str, Path] = {}
        for pat in _HF_IDENTITY_GLOBS:
            for f in self.path.glob(pat):
                if f.is_file():
                    seen[f.name] = f
        return [seen[k] for k in sorted(seen)]

    def identity(self) -> dict:
        return {"path": str(self.path.resolve()), "kind": self.kind, "files": [_stat_entry(f) for f in self._files()]}

    def config(self) -> dict:
        cfg = _load_json(self.path / "config.json", "checkpoint")
        if not isinstance(cfg, dict):
            raise ModelSourceError(f"{self.path / 'config.json'} is not a JSON object; repair or re-download the checkpoint")
        return cfg

    def shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            idx = _load_json(index, "checkpoint")
            try:
                names = sorted(set(idx["weight_map"].values()))
            except (KeyError, TypeError, AttributeError):
                raise ModelSourceError(f"{index} has no weight_map; repair or re-download the checkpoint") from None
            files = [self.path / n for n in names]
            for f in files:
                if not f.is_file():
                    raise ModelSourceError(f"{f} is listed in {index.name} but missing; re-download the checkpoint")
            return files
        return sorted(self.path.glob("*.safetensors"))

    def tensors(self) -> list[TensorSource]:
        out: dict[str, TensorSource] = {}
        for f in self.shard_files():
            header, start = read_safetensors_header(f)
            for name, ent in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                dt = _ST_DTYPES.get(ent["dtype"])
                if dt is None:
                    raise ModelSourceError(f"{f}: tensor {name} has dtype {ent['dtype']}, which offload_rt does not "
                                           "store; convert the checkpoint to float32, float16 or bfloat16")
                if name in out:
                    raise ModelSourceError(f"tensor {name} appears in two shards ({out[name].file.name}, {f.name}); "
                                           "remove the stray .safetensors file")
                out[name] = TensorSource(name, dt, tuple(int(s) for s in ent["shape"]), file=f,
                                         offset=start + int(ent["data_offsets"][0]))
        if not out:
            raise ModelSourceError(f"{self.path} has no tensors in its .safetensors files; re-download the checkpoint")
        return list(out.values())

    def tokenizer(self, dest: Path) -> dict:
        src = self.path / "tokenizer.json"
        if not src.is_file():
            raise ModelSourceError(f"{self.path} has no tokenizer.json; add the model's tokenizer.json "
                                   "(save it with transformers' AutoTokenizer.save_pretrained)")
        tok = _load_json(src, "tokenizer")
        shutil.copyfile(src, dest)
        tcfg = {}
        if (self.path / "tokenizer_config.json").is_file():
            tcfg = _load_json(self.path / "tokenizer_config.json", "tokenizer config") or {}
        gen = {}
        if (self.path / "generation_config.json").is_file():
            gen = _load_json(self.path / "generation_config.json", "generation config") or {}
        cfg = self.config()

        ids: dict[str, int] = {}
        model = tok.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            ids.update(vocab)
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            ids.update({v[0]: i for i, v in enumerate(vocab)})
        for at in tok.get("added_tokens") or []:
            ids[at["content"]] = at["id"]

        template = self._chat_template(tcfg)
        smap = {}  # legacy special_tokens_map.json: transformers reads special tokens there too
        if (self.path / "special_tokens_map.json").is_file():
            smap = _load_json(self.path / "special_tokens_map.json", "tokenizer") or {}
        bos = _token_content(tcfg.get("bos_token", smap.get("bos_token")))
        eos = _token_content(tcfg.get("eos_token", smap.get("eos_token")))
        bos_id = ids.get(bos) if bos is not None else None
        if bos_id is None and isinstance(cfg.get("bos_token_id"), int):
            bos_id = cfg["bos_token_id"]
        eos_ids: list[int] = []
        gen_eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        for v in (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
            if isinstance(v, int) and v not in eos_ids:
                eos_ids.append(v)
        if eos is not None and ids.get(eos) is not None and ids[eos] not in eos_ids:
            eos_ids.append(ids[eos])
        if "add_bos_token" in tcfg:
            add_bos = bool(tcfg["add_bos_token"])
        else:
            add_bos = _post_processor_adds_bos(tok.get("post_processor"))
        return {"file": "tokenizer.json", "chat_template": template, "bos_token": bos, "eos_token": eos,
                "bos_token_id": bos_id, "eos_token_ids": eos_ids, "add_bos_token": add_bos}

    def _chat_template(self, tcfg: dict) -> str | None:
        """The default chat template, with transformers' precedence: chat_template.jinja over tokenizer_config.json."""
        if (self.path / "chat_template.jinja").is_file():
            try:
                return (self.path / "chat_template.jinja").read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ModelSourceError(f"cannot read {self.path / 'chat_template.jinja'}: "
                                       f"{getattr(e, 'strerror', None) or e}; repair or re-download it") from None
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (self.path / "chat_template.json").is_file():
            template = (_load_json(self.path / "chat_template.json", "chat template") or {}).get("chat_template")
        return template if isinstance(template, str) else None


def _post_processor_adds_bos(pp) -> bool:
    if not isinstance(pp, dict):
        return False
    if pp.get("type") == "Sequence":
        return any(_post_processor_adds_bos(p) for p in pp.get("processors") or [])
    if pp.get("type") == "TemplateProcessing":
        single = pp.get("single") or []
        return bool(single) and "SpecialToken" in single[0]
    return False
