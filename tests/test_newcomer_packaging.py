"""Packaging (issue 21): the wheel claims no generic top-level name in site-packages, and it works.

The repository's storage/, kernels_cpu/, kernels_gpu/, configs/ and tools/ install inside the package
(pyproject.toml's package-dir); offload_rt/_folders.py resolves ``import storage`` etc. to them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from offload_rt import _folders

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_in_tree() -> set[str]:
    """Every package folder of the checkout, named as the wheel installs it."""
    names = set()
    for top in ("offload_rt", *_folders.FOLDERS):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            names.add(".".join(rel) if top == "offload_rt" else ".".join(("offload_rt", *rel)))
    return names


def test_every_package_folder_is_installed_under_offload_rt():
    assert set(CONFIG["packages"]) == _packages_in_tree()
    assert {k: v for k, v in CONFIG["package-dir"].items() if k != "offload_rt"} == {
        f"offload_rt.{name}": name for name in _folders.FOLDERS}


def test_in_a_checkout_the_folders_beside_offload_rt_are_imported():
    import configs
    import storage
    import tools

    for module, name in ((storage, "storage"), (configs, "configs"), (tools, "tools")):
        assert Path(module.__file__).resolve() == ROOT / name / "__init__.py"
    from offload_rt.presets import CONFIG_DIR

    assert CONFIG_DIR == ROOT / "configs"


@pytest.mark.slow
def test_the_wheel_installs_only_offload_rt_and_runs(tmp_path):
    """Build the wheel, install it (--no-deps) in a new venv that borrows this one's dependencies, and use it
    from a directory that is not the checkout: the folders, the presets, both console scripts."""
    whl_dir = tmp_path / "whl"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(whl_dir), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "setuptools" in build.stderr and "No matching distribution" in build.stderr:
        pytest.skip("no package index to fetch the build backend from")
    assert build.returncode == 0, build.stderr
    (wheel,) = whl_dir.glob("offload_rt-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"offload_rt", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # install: pip of this interpreter into the venv's site-packages; the dependencies come from this venv
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(purelib), str(wheel)],
                   check=True, timeout=600)
    (purelib / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert sorted(p.name for p in purelib.iterdir() if not p.name.endswith((".pth", ".dist-info"))) == ["bin", "offload_rt"]

    probe = """
import offload_rt, storage, storage.store, kernels_cpu, kernels_gpu, configs, tools, tools.report
from pathlib import Path
pkg = Path(offload_rt.__file__).parent
for m in (storage, storage.store, kernels_cpu, kernels_gpu, configs, tools, tools.report):
    assert Path(m.__file__).is_relative_to(pkg), m.__file__
from offload_rt.presets import list_presets
assert "cpu-nvme" in list_presets(), list_presets()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr
    bindir = purelib / "bin"  # pip --target puts console scripts here
    for script, needle in (("offload-run", "offload-run 0.1.0"), ("offload-report", "usage:")):
        args = ["--version"] if script == "offload-run" else ["--help"]
        res = subprocess.run([py, str(bindir / script), *args], capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=300)
        assert res.returncode == 0 and needle in res.stdout, (script, res.stdout, res.stderr)
