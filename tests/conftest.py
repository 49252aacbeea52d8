"""Shared pytest fixtures: the OAI-like sample and a factory for small DICOM series.

* ``small_sample`` -- ``kneeprep.synth.generate(root, patients=3, size="small", seed=0)`` written once per
  session; returns the sample's root ``Path`` (``raw/``, ``masks/``, ``split_files/``, ``questions.json``,
  ``quintuples.jsonl``, ``truth.json``). Treat it as read-only: copy what you want to break.
* ``synth_series`` -- a factory ``make(folder, shape=(8, 32, 32), spacing=(0.7, 0.5, 0.5), direction=PIR,
  origin=(0, 0, 0), **write_series_kwargs) -> SeriesOnDisk`` writing a small sagittal MR series (a smooth
  ramp, so every slice differs) with :func:`kneeprep.synth.write_series`; defect fixtures pass ``tags`` /
  ``slice_tags`` / ``file_names`` or edit the returned files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

#: ITK row-major direction of a "PIR" sagittal grid: ITK axis 0 (columns) -> P, 1 (rows) -> I, 2 (slices) -> R.
PIR_DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


@dataclass(frozen=True)
class SeriesOnDisk:
    folder: Path
    files: list[Path]
    array: np.ndarray
    geometry: object  # kneeprep.geometry.Geometry


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory) -> Path:
    from kneeprep.synth import generate

    root = tmp_path_factory.mktemp("sample")
    generate(root, patients=3, size="small", seed=0)
    return root


@pytest.fixture
def synth_series(tmp_path):
    from kneeprep.geometry import Geometry, affine_from_itk
    from kneeprep.synth import write_series

    def make(
        folder: str | Path = "series",
        shape=(8, 32, 32),
        spacing=(0.7, 0.5, 0.5),
        direction=PIR_DIRECTION,
        origin=(0.0, 0.0, 0.0),
        **kwargs,
    ) -> SeriesOnDisk:
        folder = Path(folder)
        if not folder.is_absolute():
            folder = tmp_path / folder
        z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
        array = (100 + 20 * z + 3 * y + x).astype(np.uint16)
        itk_spacing = tuple(reversed(spacing))
        geometry = Geometry(tuple(shape), tuple(spacing), affine_from_itk(origin, itk_spacing, direction))
        files = write_series(array, geometry, folder, **kwargs)
        return SeriesOnDisk(folder, files, array, geometry)

    return make


# -- shards for the loader tests (tests/test_loader.py, tests/test_slabs.py) ---------------------------------


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """12 train volumes x 3 quintuples (36 samples) in several shards, about one volume per row group."""
    from test_shards import FakeData

    from kneeprep.formats.quintuples import build_quintuples
    from kneeprep.formats.shard_writer import write_shards
    from kneeprep.recipe import Shards

    data = FakeData(n_patients=12)
    recipe = data.recipe.__class__(splits=data.recipe.splits, shards=Shards(target_bytes=20000, codec="lz4"))
    qs, _ = build_quintuples(data.annotations, data.attrs, recipe)
    out = tmp_path_factory.mktemp("loader_shards")
    m = write_shards(qs, data.read_volume, out, recipe, row_group_bytes=6000)
    train = [q.sample_id for q in qs if q.split == "train"]
    assert len([e for e in m["shards"] if e["split"] == "train"]) > 2
    return out, train, data


@pytest.fixture(scope="session")
def blosc_shards(shards, tmp_path_factory):
    """The same quintuples as ``shards`` with Blosc-compressed volumes (compressed in this process)."""
    from kneeprep.formats.quintuples import build_quintuples
    from kneeprep.formats.shard_writer import write_shards
    from kneeprep.recipe import Shards

    _, _, data = shards
    recipe = data.recipe.__class__(
        splits=data.recipe.splits, shards=Shards(target_bytes=20000, codec="blosc-lz4", level=5)
    )
    qs, _ = build_quintuples(data.annotations, data.attrs, recipe)
    out = tmp_path_factory.mktemp("blosc_shards")
    write_shards(qs, data.read_volume, out, recipe, row_group_bytes=6000)
    return out


@pytest.fixture(scope="session")
def raw_shards(shards, tmp_path_factory):
    """The same quintuples as ``shards`` with uncompressed volumes (the ``none`` layout: used in place)."""
    from kneeprep.formats.quintuples import build_quintuples
    from kneeprep.formats.shard_writer import write_shards
    from kneeprep.recipe import Shards

    _, _, data = shards
    recipe = data.recipe.__class__(splits=data.recipe.splits, shards=Shards(target_bytes=20000, codec="none"))
    qs, _ = build_quintuples(data.annotations, data.attrs, recipe)
    out = tmp_path_factory.mktemp("raw_shards")
    write_shards(qs, data.read_volume, out, recipe, row_group_bytes=6000)
    return out


# -- a real S3 server (moto) on 127.0.0.1 for the object-storage tests (tests/s3server.py) ------------------


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free port of 127.0.0.1 for the whole session (skips without ``moto``/``s3fs``);
    an :class:`s3server.S3Server` with ``endpoint_url``, ``storage_options``, ``env`` and ``requests``."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from s3server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh empty bucket on ``s3_server`` (removed after the test): an :class:`s3server.S3Bucket` with
    ``bucket``, ``url(prefix)``, ``fs`` (s3fs), ``storage_options``, ``env`` and ``gets(prefix)``."""
    from s3server import new_bucket

    b = new_bucket(s3_server)
    yield b
    b.fs.rm(b.bucket, recursive=True)
