"""The wheel, installed in a fresh venv, runs the documented rebuild outside the source tree (issue 22, point 4).

No network: the wheel is built without build isolation (setuptools and packaging of this environment, the
`test` extra), from a copy of the files an sdist holds, so the build writes nothing into the tree and can only
see what is meant to be packaged. The fresh venv gets its dependencies from this interpreter's site-packages
through a ``.pth`` file (a path line there is only appended to ``sys.path``: the ``.pth`` files inside it, like
an editable install's hook, are not run), and the wheel is installed with ``--no-deps --no-index``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
#: what an sdist of kneeprep holds (pyproject's readme and license-files, the package)
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "kneeprep")


def _env() -> dict:
    # nothing of the source tree on the path: developers run the suite with PYTHONPATH=<tree>, and an editable
    # install leaves kneeprep.egg-info there, which pip would take for kneeprep already installed
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _run(args: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"{args}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _build_tools_or_fail() -> None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    need = {"setuptools": "77.0.3", "packaging": "24.2"}
    try:
        old = {k: version(k) for k in need if Version(version(k)) < Version(need[k])}
    except PackageNotFoundError as e:
        old = {e.name: "missing"}
    if old:
        pytest.fail(
            f"the wheel is built without isolation: needs {need} in this environment, found {old} "
            "(pip install -e '.[test]')"
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with kneeprep installed from a wheel built here; returns the venv folder."""
    _build_tools_or_fail()
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("kneeprep-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    py = venv / "bin" / "python"
    # install first, into the bare venv: with the dependencies' folder visible, pip would take this
    # environment's kneeprep (editable, the tree) for already installed
    _run([*pip, "--python", py, "install", "--no-deps", "--no-index", "--no-compile", wheel], cwd=tmp)
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
    deps = dict.fromkeys(
        [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    )
    Path(purelib.stdout.strip(), "_kneeprep_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return venv


def test_the_wheel_carries_the_recipes_and_the_licence(installed):
    (wheel,) = installed.parent.glob("dist/kneeprep-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"kneeprep/recipes/3dreasonknee.toml", "kneeprep/recipes/m3d-32x256x256.toml"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert not any(n.startswith(("tests/", "bench/", "recipes/")) for n in names), sorted(names)[:20]


def test_installed_wheel_rebuilds_a_sample_outside_the_source_tree(installed, tmp_path):
    """`kneeprep recipe list|show NAME` and `kneeprep rebuild --recipe 3dreasonknee`, run from a folder outside
    the tree by the venv's own `kneeprep`, use the installed package (not the tree) and produce volumes and
    shards that validate."""
    kp = installed / "bin" / "kneeprep"
    work = tmp_path / "work"
    work.mkdir()
    where = _run(
        [installed / "bin" / "python", "-c", "import kneeprep; print(kneeprep.__file__)"],
        cwd=work,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(installed.resolve()), where
    assert not Path(where).resolve().is_relative_to(ROOT.resolve()), where

    listed = _run([kp, "recipe", "list"], cwd=work).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["3dreasonknee", "m3d-32x256x256"]
    assert all(Path(line.split("\t")[2]).resolve().is_relative_to(installed.resolve()) for line in listed)
    shown = _run([kp, "recipe", "show", "3dreasonknee"], cwd=work).stdout
    assert shown.startswith("# recipe '3dreasonknee'") and "[geometry]" in shown

    _run([kp, "synth", "sample", "--patients", "1", "--size", "small", "--no-progress"], cwd=work)
    res = _run(
        [kp, "rebuild", "--recipe", "3dreasonknee", "--raw", "sample/raw", "--annotations", "sample",
         "--masks", "sample", "--out", "out", "--workers", "0", "--no-progress"],
        cwd=work,
    )  # fmt: skip
    assert "recipe '3dreasonknee'" in res.stdout
    report = json.loads((work / "out" / "report.json").read_text())
    assert report["ok"] and report["stages"]["validate"]["problems"] == []
    truth = json.loads((work / "sample" / "truth.json").read_text())
    volumes = truth["volumes"] if "volumes" in truth else truth
    assert report["stages"]["convert"]["counts"]["written"] == len(volumes) >= 1
    groups = sorted(p.parent.name for p in (work / "out" / "volumes.zarr").glob("*/zarr.json"))
    assert groups == sorted([*volumes, "OME"])  # the volumes and the OME collection's listing
    manifest = json.loads((work / "out" / "shards" / "manifest.json").read_text())
    assert manifest["recipe_name"] == "3dreasonknee" and manifest["shards"]
    assert all((work / "out" / "shards" / s["path"]).is_file() for s in manifest["shards"])
    assert (
        sum(s["rows"] for s in manifest["shards"])
        == sum(report["stages"]["shards"]["quintuples"].values())
        > 0
    )
    _run([kp, "validate", "out/shards"], cwd=work)
