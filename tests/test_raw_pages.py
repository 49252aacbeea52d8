"""Images taken from the mapped file (kneeprep.formats.raw_pages) equal Arrow's reading of the same bytes, for
every page layout Arrow writes; anything else falls back to Arrow."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kneeprep.formats.raw_pages import MappedFile, image_extents
from kneeprep.formats.shard_reader import read_row_group
from kneeprep.formats.shard_writer import write_shards
from kneeprep.geometry import Geometry
from kneeprep.recipe import Recipe, Shards, Splits

RNG = np.random.default_rng(3)


def _values(n_rows: int, every: int) -> list[bytes | None]:
    return [RNG.bytes(int(RNG.integers(0, 3000))) if i % every == 0 else None for i in range(n_rows)]


def _arrow(pf: pq.ParquetFile, g: int) -> list[bytes | None]:
    return pf.read_row_group(g, columns=["image"]).column("image").to_pylist()


def _from_file(path, pf: pq.ParquetFile, g: int) -> list[bytes | None] | None:
    data = path.read_bytes()
    ext = image_extents(data, pf.metadata, g)
    if ext is None:
        return None
    return [data[o : o + n] if (o, n) != (None, None) else None for o, n in
            (ext.get(i, (None, None)) for i in range(pf.metadata.row_group(g).num_rows))]  # fmt: skip


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("page_size", [1 << 20, 2048])  # one page per chunk, or values over many pages
@pytest.mark.parametrize("every", [1, 3, 60])
def test_extents_equal_arrow_for_every_page_layout(tmp_path, version, page_size, every):
    path = tmp_path / "x.parquet"
    schema = pa.schema([("image", pa.large_binary()), ("k", pa.int64())])
    with pq.ParquetWriter(
        path, schema, compression="NONE", use_dictionary=False, data_page_version=version,
        data_page_size=page_size, write_batch_size=7, write_page_checksum=True,
    ) as w:  # fmt: skip
        for n in (60, 13, 1):
            w.write_table(pa.table({"image": _values(n, every), "k": list(range(n))}, schema=schema))
    pf = pq.ParquetFile(path)
    for g in range(pf.num_row_groups):
        assert _from_file(path, pf, g) == _arrow(pf, g)


def test_a_required_column_has_no_definition_levels(tmp_path):
    path = tmp_path / "x.parquet"
    schema = pa.schema([pa.field("image", pa.large_binary(), nullable=False)])
    pq.write_table(
        pa.table({"image": _values(9, 1)}, schema=schema), path, compression="NONE", use_dictionary=False
    )
    pf = pq.ParquetFile(path)
    assert _from_file(path, pf, 0) == _arrow(pf, 0)


@pytest.mark.parametrize("opts", [{"compression": "LZ4"}, {"compression": "NONE", "use_dictionary": True}])
def test_compressed_or_dictionary_chunks_are_left_to_arrow(tmp_path, opts):
    path = tmp_path / "x.parquet"
    vals = [b"same" * 100] * 20  # repeated: a dictionary is used when allowed
    pq.write_table(pa.table({"image": pa.array(vals, pa.large_binary())}), path, **opts)
    pf = pq.ParquetFile(path)
    assert _from_file(path, pf, 0) is None


def test_a_damaged_length_prefix_is_left_to_arrow(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"image": pa.array([b"a" * 500, None, b"b" * 700], pa.large_binary())}), path,
                   compression="NONE", use_dictionary=False)  # fmt: skip
    pf = pq.ParquetFile(path)
    data = bytearray(path.read_bytes())
    (off, n), _ = image_extents(data, pf.metadata, 0).values()
    data[off - 4 : off] = (n + 1).to_bytes(4, "little")  # the value would run past its page
    path.write_bytes(bytes(data))
    assert _from_file(path, pq.ParquetFile(path), 0) is None


@pytest.mark.parametrize("codec", ["none", "blosc-lz4", "lz4"])
def test_shard_volumes_read_from_the_file_equal_arrows(tmp_path, codec):
    from kneeprep.formats.quintuples import Quintuple

    shape = (5, 6, 7)
    vols = {f"P{i}_1_s_d_1": RNG.integers(0, 4000, shape, dtype=np.uint16) for i in range(3)}
    geom = Geometry(shape, (1.0, 1.0, 1.0), np.eye(4))
    qs = [
        Quintuple(sample_id=f"{v}_{q}", volume_id=v, patient_id=v[:2], split="train", question_id=str(q),
                  question_type="bml", question_region="r", question="q", box=None, box_empty=True,
                  box_reason="t", reasoning=("a",), severity=(), answer_json="{}")
        for v in vols for q in range(4)
    ]  # fmt: skip
    # several volumes per row group, so a chunk holds several images
    recipe = Recipe(splits=Splits(source="generated"), shards=Shards(codec=codec, level=3))
    out = tmp_path / "shards"
    write_shards(qs, lambda v: (vols[v], geom), out, recipe, row_group_bytes=2 * vols["P0_1_s_d_1"].nbytes)
    files = sorted((out / "data").glob("*.parquet"))
    assert files
    seen = set()
    for f in files:
        pf = pq.ParquetFile(f)
        mapped = MappedFile(f)
        try:
            for g in range(pf.num_row_groups):
                assert (image_extents(mapped.map, pf.metadata, g) is None) == (codec == "lz4")
                rows_a, vols_a = read_row_group(pf, g)
                rows_b, vols_b = read_row_group(pf, g, mapped=mapped)
                slab = {}
                rows_c, vols_c = read_row_group(
                    pf, g, mapped=mapped, alloc=lambda v, s, d, slab=slab: slab.setdefault(v, np.empty(s, d))
                )
                assert rows_a == rows_b == rows_c
                assert vols_a.keys() == vols_b.keys() == vols_c.keys()
                for v in vols_a:
                    np.testing.assert_array_equal(vols_a[v], vols[v])
                    np.testing.assert_array_equal(vols_b[v], vols[v])
                    assert vols_c[v] is slab[v]
                    np.testing.assert_array_equal(vols_c[v], vols[v])
                    assert not vols_b[v].flags.writeable
                    if codec == "none":  # in place: a view of the mapped file, no copy
                        assert np.shares_memory(vols_b[v], np.frombuffer(mapped.map, np.uint8))
                seen |= vols_a.keys()
                del vols_b
        finally:
            mapped.close()
    assert seen == set(vols)
