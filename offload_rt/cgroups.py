"""Where this process's cgroups are: the one walker that memory budgets and CPU counts share.

``/proc/self/cgroup`` lists one line per hierarchy: ``ID:controllers:path`` for cgroup v1
(``4:memory:/job``, ``3:cpu,cpuacct:/job``) and ``0::/path`` for the v2 unified hierarchy.
A path that does not exist under the mount (a cgroup namespace shows ``/``-relative paths of
another view) is tried from the mount itself.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def directories(controller: str, proc_cgroup: Path = PROC_CGROUP, root: Path = ROOT) -> list[tuple[Path, bool]]:
    """(directory, is_v2) for ``controller`` ("memory", "cpu"): this process's cgroup first, then each
    ancestor up to the mount. Limits set on any of them apply."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[Path, bool]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            base, v2 = (root if (root / "cgroup.controllers").exists() else root / "unified"), True
        elif controller in controllers.split(","):
            mount = root / controllers
            base, v2 = (mount if mount.is_dir() else root / controller), False
        else:
            continue
        d = base / rel if (base / rel).is_dir() else base
        while True:
            out.append((d, v2))
            if d == base or base not in d.parents:
                break
            d = d.parent
    return out
