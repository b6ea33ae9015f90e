"""The store directory on disk: its converted weight stores, and what runs leave beside them.

What lives under the store directory (``RunConfig.store_dir``, ``--offload-dir``):

* ``<name>-<key>[-<weights>].zarr/``: a weight store (storage.convert); its manifest.json records the
  source (path, kind, identity: file names, sizes, times) and the ``--weights`` choice; its ``last_used``
  file is touched by every run that opens it;
* ``<store>.zarr.tmp-<pid>`` / ``<store>.zarr.old-<pid>``: a conversion in progress (or a store being
  replaced by ``--rebuild-store``), garbage once that process is gone;
* ``kv-cache/kv-<pid>-<random>/``: KV chunks a run spilled, flock'ed by the run for its whole life
  (storage.kv_store), garbage once the lock is free;
* ``prefix-cache/<store name>/``: the prefix cache of that store's model, garbage once the store is.

A store is *stale* when the runtime would never open it again: its checkpoint is gone, or is no longer
the one converted (another file set, size or modification time), or the store's name is not the one
this version gives that checkpoint (another store format). This module finds, measures and removes;
the commands that print (``offload-run list``, ``rm``, ``prune``) are offload_rt/cli_stores.py.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from offload_rt.config import KV_SPILL_DIR, PREFIX_CACHE_DIR
from offload_rt.errors import UsageError

STORE_SUFFIX = ".zarr"


@dataclass(frozen=True)
class Store:
    """One converted weight store, as ``offload-run list`` shows it."""

    path: Path
    source: str | None  # the checkpoint it was converted from (None: the manifest cannot be read)
    weights: str  # the --weights choice it was converted with
    formats: tuple[str, ...]  # its tensors' stored formats, most bytes first
    size: int  # bytes on disk (allocated blocks, as du counts them)
    last_used: float | None  # when a run last opened it (epoch seconds; its conversion until then)
    stale: str | None  # why the runtime would not open it again; None while it serves its source

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Removal:
    """A directory ``rm`` or ``prune`` removes, its size on disk and why it goes."""

    path: Path
    size: int
    why: str


def disk_bytes(path: Path) -> int:
    """Bytes ``path`` takes on disk (allocated blocks, each hard-linked file once, symlinks not followed): du's figure."""
    seen: set[tuple[int, int]] = set()
    total = 0
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    total += st.st_blocks * 512
    if not os.path.isdir(path) or os.path.islink(path):  # a link counts as itself, not what it points to
        return total
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # removed meanwhile
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def stores(store_dir: Path) -> list[Store]:
    """Every weight store under ``store_dir``, by name (none when the directory does not exist)."""
    try:
        paths = sorted(p for p in Path(store_dir).iterdir() if p.name.endswith(STORE_SUFFIX) and p.is_dir())
    except FileNotFoundError:
        return []
    return [_describe(p) for p in paths]


def _describe(path: Path) -> Store:
    from storage.errors import StorageError
    from storage.manifest import MANIFEST, load_manifest, tensor_format

    try:
        manifest = load_manifest(path)
    except StorageError as e:
        why = "no manifest" if not (path / MANIFEST).exists() else "unreadable manifest"
        return Store(path, None, "?", (), disk_bytes(path), _mtime(path), why)
    by_format: dict[str, int] = {}
    for entry in manifest["tensors"].values():
        fmt = tensor_format(entry)
        by_format[fmt] = by_format.get(fmt, 0) + int(entry["nbytes"])
    weights = manifest.get("weights", "auto")
    return Store(path, manifest["source"].get("path"), weights,
                 tuple(sorted(by_format, key=lambda f: -by_format[f])), disk_bytes(path),
                 _last_used(path), _staleness(path, manifest["source"], weights))


def _last_used(path: Path) -> float | None:
    from storage.convert import LAST_USED
    from storage.manifest import MANIFEST

    return _mtime(path / LAST_USED) or _mtime(path / MANIFEST)  # never opened since its conversion


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _staleness(path: Path, source: dict, weights: str) -> str | None:
    """Why the runtime would not open the store at ``path`` for its ``source`` again; None when it would."""
    from storage.convert import store_path
    from storage.errors import StorageError
    from storage.sources import open_source

    where = source.get("path")
    if not where:
        return "no source recorded"
    if not os.path.lexists(where):
        return "source gone"
    try:
        identity = open_source(where).identity()
    except (StorageError, OSError):
        return "source no longer a checkpoint"
    recorded = source.get("identity")
    if recorded is not None and _canonical(recorded) != _canonical(identity):
        return "source changed since conversion"
    try:
        current = store_path(where, path.parent, weights).name
    except (StorageError, OSError):
        current = None
    if current != path.name:
        return "another store format version"
    return None


def _canonical(identity) -> str:
    return json.dumps(identity, sort_keys=True)


def find(store_dir: Path, name: str) -> Store:
    """The store called ``name`` (its directory name, or a prefix of exactly one); a UsageError naming the
    candidates otherwise."""
    listed = stores(store_dir)
    exact = [s for s in listed if s.name == name]
    matches = exact or [s for s in listed if s.name.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"{name!r} matches {len(matches)} weight stores in {store_dir}: "
                         f"{', '.join(s.name for s in matches)}; give more of the name")
    if not listed:
        raise UsageError(f"no weight store named {name!r}: {store_dir} holds none")
    raise UsageError(f"no weight store named {name!r} in {store_dir}; its stores: "
                     f"{', '.join(s.name for s in listed)}")


def store_removals(store_dir: Path, store: Store, why: str) -> list[Removal]:
    """What removing ``store`` removes: the store, and its prefix cache when there is one."""
    items = [Removal(store.path, store.size, why)]
    prefix = Path(store_dir) / PREFIX_CACHE_DIR / store.name
    if prefix.is_dir():
        items.append(Removal(prefix, disk_bytes(prefix), f"the prefix cache of {store.name}"))
    return items


def garbage(store_dir: Path, listed: list[Store] | None = None) -> list[Removal]:
    """What ``prune`` removes: stale stores (with their prefix caches), the leftovers of conversions whose
    process is gone, KV spill directories no live run holds, and prefix caches whose store is gone.
    ``listed``: :func:`stores` of ``store_dir`` when the caller has it already."""
    from storage.convert import dead_leftovers
    from storage.kv_store import stale_stores

    store_dir = Path(store_dir)
    listed = stores(store_dir) if listed is None else listed
    items: list[Removal] = []
    for s in listed:
        if s.stale:
            items += store_removals(store_dir, s, f"stale: {s.stale}")
    for p in sorted(dead_leftovers(store_dir)):
        items.append(Removal(p, disk_bytes(p), "a conversion's leftover; its process is gone"))
    for p in sorted(stale_stores(store_dir / KV_SPILL_DIR)):
        items.append(Removal(p, disk_bytes(p), "KV spill of a run that is gone"))
    named = {r.path for r in items}
    present = {s.name for s in listed}
    for p in _store_named_dirs(store_dir / PREFIX_CACHE_DIR):
        if p.name not in present and p not in named:
            items.append(Removal(p, disk_bytes(p), "the prefix cache of a store that is gone"))
    return items


def _store_named_dirs(root: Path) -> list[Path]:
    """The directories under ``root`` named as a store is (anything else there is not ours to judge)."""
    try:
        return sorted(p for p in root.iterdir() if p.name.endswith(STORE_SUFFIX) and p.is_dir())
    except OSError:
        return []


def remove(item: Removal) -> bool:
    """Remove ``item``'s directory (a link: the link); False when it was gone already (another prune, a run's
    own cleanup). An OSError (permissions) is the caller's to report."""
    if not os.path.lexists(item.path):
        return False
    try:
        if item.path.is_symlink():
            item.path.unlink()
        else:
            shutil.rmtree(item.path)
    except FileNotFoundError:  # another cleaner removed part of it meanwhile: gone all the same
        pass
    return True
