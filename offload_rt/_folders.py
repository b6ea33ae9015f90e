"""The repository's other top-level folders, importable under their own names wherever offload_rt lives.

The code imports ``storage``, ``kernels_cpu``, ``kernels_gpu``, ``configs`` and ``tools`` as top-level
packages, as they are in a checkout. A wheel must not claim such generic names in site-packages, so
the build installs them inside the package (``offload_rt/storage``, ... : pyproject.toml's
``package-dir``). This finder, installed by ``import offload_rt``, resolves each of those names to
the folder that belongs to this offload_rt:

* an installed wheel: ``offload_rt/<name>`` (inside the package);
* a checkout (run from it, or an editable install run from anywhere): ``<name>`` beside ``offload_rt/``.

Only the five top-level names are resolved here; their submodules follow the package's ``__path__``,
so every module has one name (``storage.store``, never also ``offload_rt.storage.store``) and one
copy. It sits first on ``sys.meta_path``: once offload_rt is imported, these names are offload_rt's
in this process, whatever else is installed (another distribution's ``tools`` cannot shadow them).
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

FOLDERS = ("storage", "kernels_cpu", "kernels_gpu", "configs", "tools")
_HERE = Path(__file__).resolve().parent  # the offload_rt package's folder


def folder(name: str) -> Path | None:
    """Where the package ``name`` (one of FOLDERS) of this offload_rt is: inside it (a wheel), else beside it."""
    for place in (_HERE, _HERE.parent):
        if (place / name / "__init__.py").is_file():
            return place
    return None


class FolderFinder:
    """A meta path finder for FOLDERS (see the module's docstring)."""

    @staticmethod
    def find_spec(fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname not in FOLDERS:
            return None
        place = folder(fullname)
        return PathFinder.find_spec(fullname, [str(place)]) if place is not None else None

    @staticmethod
    def invalidate_caches() -> None:
        pass


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, FolderFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, FolderFinder())
