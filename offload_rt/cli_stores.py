"""``offload-run list``, ``rm`` and ``prune``: the weight stores under ``--offload-dir``, and removing them.

What is found, measured and removed is offload_rt/stores.py; this module prints it: one table for
``list``, one line per removed directory (with its size and why) and the bytes freed for ``rm`` and
``prune``. Nothing is removed without its line being printed; ``prune --dry-run`` prints the same
lines and removes nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from offload_rt import stores
from offload_rt.cli import CONTEXT, DEBUG, OFFLOAD_DIR, reported
from offload_rt.config import RunConfig, format_size


def _store_dir(offload_dir: Path | None) -> Path:
    return RunConfig(offload_dir=offload_dir).store_dir  # the directory runs use (--offload-dir or the default)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t is not None else "-"


def _format(s: stores.Store) -> str:
    main = s.formats[0] if s.formats else "?"
    return f"{s.weights}: {main}" if s.weights != main else main


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as lines of left-aligned columns, two spaces apart (the last column unpadded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]) for r in rows]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@click.command("list", context_settings=CONTEXT)
@OFFLOAD_DIR
@DEBUG
def list_command(offload_dir, debug):
    """List the converted weight stores: NAME (for offload-run rm), the checkpoint each was converted from,
    its format (--weights: the main stored format), size on disk, when a run last used it, and whether it
    is stale (its checkpoint gone or changed since: offload-run prune removes those)."""
    store_dir = _store_dir(offload_dir)
    with reported(debug):
        listed = stores.stores(store_dir)
        if not listed:
            print(f"no weight stores in {store_dir}")
        else:
            rows = [("NAME", "SOURCE", "FORMAT", "SIZE", "LAST USED", "STATE")]
            rows += [(s.name, s.source or "?", _format(s), format_size(s.size), _when(s.last_used),
                      f"stale: {s.stale}" if s.stale else "ok") for s in listed]
            print("\n".join(_table(rows)))
            print(f"{_plural(len(listed), 'store')}, {format_size(sum(s.size for s in listed))} in {store_dir}")
        junk = stores.garbage(store_dir, listed)
        if junk:
            print(f"offload-run prune would free {format_size(sum(r.size for r in junk))} "
                  f"({_plural(len(junk), 'item')})")


@click.command("rm", context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@OFFLOAD_DIR
@DEBUG
def rm_command(names, offload_dir, debug):
    """Remove weight stores, each NAME as offload-run list shows it (or the start of exactly one name),
    with its prefix cache. A later run of its model converts it again."""
    store_dir = _store_dir(offload_dir)
    with reported(debug):
        found = {s.path: s for s in (stores.find(store_dir, n) for n in names)}  # all named before any goes
        items = [r for s in found.values() for r in stores.store_removals(store_dir, s, "")]
        _remove(store_dir, items, dry_run=False)


@click.command("prune", context_settings=CONTEXT)
@OFFLOAD_DIR
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@DEBUG
def prune_command(offload_dir, dry_run, debug):
    """Remove what no run will use again: stale weight stores (their checkpoint is gone, e.g. deleted or on
    a disk not mounted now, or changed since conversion, or they have another store format), leftovers of
    killed conversions, KV spilled by runs that are gone, and prefix caches of stores that are gone.
    Each is printed with its size, then the bytes freed."""
    store_dir = _store_dir(offload_dir)
    with reported(debug):
        items = stores.garbage(store_dir)
        if not items:
            print(f"nothing to prune in {store_dir}")
            return
        _remove(store_dir, items, dry_run=dry_run)


def _remove(store_dir: Path, items: list[stores.Removal], *, dry_run: bool) -> None:
    """Remove each item, printing its line once it is gone (``dry_run``: every line, nothing removed), then
    the total."""
    verb = "would remove" if dry_run else "removed"
    freed = n = 0
    for item in items:
        if not dry_run and not stores.remove(item):
            continue  # gone meanwhile: freed nothing
        where = item.path.relative_to(store_dir) if item.path.is_relative_to(store_dir) else item.path
        print(f"{verb} {where} ({format_size(item.size)}{', ' + item.why if item.why else ''})", flush=True)
        freed += item.size
        n += 1
    print(f"{'would free' if dry_run else 'freed'} {format_size(freed)} ({_plural(n, 'item')}) in {store_dir}")
    sys.stdout.flush()


COMMANDS = {"list": list_command, "rm": rm_command, "prune": prune_command}
