"""Presets as data: hardware profiles and planner defaults in ``configs/*.toml``.

A hardware preset (``--config laptop-8gb-gpu`` or ``--config path/to/mine.toml``)
sets any of :data:`PRESET_KEYS`; values given on the command line win
(:func:`merge`). ``configs/defaults.toml`` holds the planner's tunables
(:func:`load_defaults`, schema :data:`DEFAULTS_SCHEMA`).

The files ship in the repository's ``configs/`` directory, found where
:mod:`offload_rt._folders` finds it: beside ``offload_rt/`` in a source checkout or an
editable install, inside it in a wheel (``offload_rt/configs``).

Every problem — missing file, bad TOML, unknown key, bad value — is a
UsageError with one line naming the file and the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping

from offload_rt._folders import folder
from offload_rt.config import parse_size
from offload_rt.errors import UsageError

CONFIG_DIR = (folder("configs") or Path(__file__).resolve().parents[1]) / "configs"
DEFAULTS_FILE = CONFIG_DIR / "defaults.toml"


# ---------------------------------------------------------------------------- value checkers
# Each takes (value, where) and returns the normalised value or raises UsageError.


def _size(value: Any, where: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{where}: expected a size such as \"8G\", \"512M\", 0 or \"auto\", got {value!r}")
    return parse_size(value, option=where)


def _int_min(lo: int) -> Callable[[Any, str], int]:
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise UsageError(f"{where}: expected an integer >= {lo}, got {value!r}")
        return value

    return check


def _positive_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UsageError(f"{where}: expected a positive number (bytes/s, e.g. 1.3e9), got {value!r}")
    return float(value)


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UsageError(f"{where}: expected a fraction in [0, 1), got {value!r}")
    return float(value)


def _choice(*options: str) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if value not in options:
            raise UsageError(f"{where}: expected one of {', '.join(options)}, got {value!r}")
        return value

    return check


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{where}: expected a string, got {value!r}")
    return value


def _path(value: Any, where: str) -> Path:
    return Path(_string(value, where)).expanduser()


# ---------------------------------------------------------------------------- schemas

BANDWIDTH_KEYS: dict[str, Callable] = {
    "disk_read": _positive_float,  # bytes/s, cold sequential read of the offload dir
    "mem_read": _positive_float,  # bytes/s, RAM read
    "matvec": _positive_float,  # weight bytes/s of a decode mat-vec
    "h2d": _positive_float,  # bytes/s, pinned host→device copy
}

# Hardware preset keys → checker; tables map to a nested schema.
PRESET_KEYS: dict[str, Any] = {
    "description": _string,  # one line shown by --plan
    "device": _choice("auto", "cpu", "cuda"),
    "gpu_mem": _size,  # device tier budget
    "cpu_mem": _size,  # host tier budget
    "prefetch_depth": _int_min(1),  # streamed groups in flight (omit: the planner decides)
    "prefill_chunk": _int_min(1),  # prompt tokens per prefill pass
    "threads": _int_min(1),  # torch intra-op threads
    "dtype": _choice("float32", "bfloat16", "float16"),
    "weights": _choice("auto", "f32", "f16", "bf16", "int8", "int4"),  # stored weight format
    "offload_dir": _path,  # where weight stores live
    "bandwidths": BANDWIDTH_KEYS,  # hints used instead of measuring
}

DEFAULTS_SCHEMA: dict[str, Any] = {
    "planner": {"min_prefetch_depth": _int_min(1), "max_prefetch_depth": _int_min(1)},
    "budgets": {
        "cpu_margin_fraction": _fraction,
        "cpu_margin_min": _size,
        "gpu_margin_fraction": _fraction,
        "gpu_margin_min": _size,
        "runtime_slack": _size,
        "cgroup_margin_min": _size,
    },
    "io": {"read_chunk": _size},
    "run": {"prefill_chunk": _int_min(1)},
    "calibrate": {
        "disk_test_bytes": _size,
        "mem_test_bytes": _size,
        "matvec_dtype": _choice("float32", "bfloat16", "float16"),
    },
}


def _validate(data: Mapping[str, Any], schema: Mapping[str, Any], where: str, prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise UsageError(f"{where}: unknown key {name!r}; known keys: {known}")
        rule = schema[key]
        if isinstance(rule, Mapping):
            if not isinstance(value, Mapping):
                raise UsageError(f"{where}: {name!r} must be a table ([{name}])")
            out[key] = _validate(value, rule, where, prefix=f"{name}.")
        else:
            out[key] = rule(value, f"{where}: {name}")
    return out


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found; name a preset ({', '.join(list_presets())}) or a .toml file") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a directory; name a .toml file") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML ({e}); fix the file") from None


# ---------------------------------------------------------------------------- public API


def list_presets() -> list[str]:
    """Names (file stems) of the hardware presets shipped in configs/."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml") if p.stem != DEFAULTS_FILE.stem)


def preset_path(name_or_path: str | Path) -> Path:
    """A path to an existing file as given, else ``configs/<name>.toml``; else UsageError."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    text = str(name_or_path)
    if "/" not in text and "\\" not in text:
        stem = text[:-5] if text.endswith(".toml") else text
        shipped = CONFIG_DIR / f"{stem}.toml"
        if shipped.is_file() and stem != DEFAULTS_FILE.stem:
            return shipped
    raise UsageError(
        f"config {text!r} not found; give a .toml file or one of the presets: {', '.join(list_presets()) or 'none'}"
    )


def load_preset(path: str | Path) -> dict:
    """Read and validate a hardware preset (a path, or a preset name from configs/).

    Sizes are parsed (int bytes or "auto"); ``bandwidths`` is a dict of floats.
    """
    p = preset_path(path)
    return _validate(_read_toml(p), PRESET_KEYS, str(p))


def load_defaults(path: str | Path = DEFAULTS_FILE) -> dict:
    """configs/defaults.toml, validated: {"planner": {...}, "budgets": {...}, ...}."""
    p = Path(path)
    data = _validate(_read_toml(p), DEFAULTS_SCHEMA, str(p))
    planner = data.get("planner", {})
    if planner.get("min_prefetch_depth", 1) > planner.get("max_prefetch_depth", 1 << 30):
        raise UsageError(f"{p}: planner.min_prefetch_depth must not exceed planner.max_prefetch_depth")
    return data


def merge(preset: Mapping[str, Any], cli_values: Mapping[str, Any]) -> dict:
    """Preset values overlaid with the command line's: a CLI value wins unless it is None (not given).

    Tables (``bandwidths``) merge key by key.
    """
    out = dict(preset)
    for key, value in cli_values.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# RunConfig fields a preset may set (preset key -> RunConfig field); CLI options the user typed win.
_RUNCONFIG_FIELDS = {"device": "device", "gpu_mem": "gpu_mem", "cpu_mem": "cpu_mem",
                     "prefetch_depth": "prefetch_depth", "prefill_chunk": "prefill_chunk", "threads": "threads",
                     "dtype": "dtype", "weights": "weights", "offload_dir": "offload_dir",
                     "bandwidths": "bandwidth_hints"}


def apply_preset(cfg, name_or_path: str | Path, *, given: set[str] = frozenset()):
    """A copy of RunConfig ``cfg`` with the preset's values for every option not given on the command line."""
    from dataclasses import replace

    preset = load_preset(name_or_path)
    changes = {}
    for key, value in preset.items():
        fieldname = _RUNCONFIG_FIELDS.get(key)
        if fieldname is None or key in given:
            continue
        changes[fieldname] = dict(value) if key == "bandwidths" else value
    return replace(cfg, config_file=preset_path(name_or_path), **changes)
