"""Parquet shards of quintuples: the Arrow schema and the image codecs (what every shard reader needs).

Layout (``docs/SHARDS.md`` is the user-facing description; names from :mod:`kneeprep.formats.shard_plan`)::

    SHARDS/
      README.md                                dataset card, with the Hugging Face YAML block (configs, features)
      data/train-00000-of-00004.parquet ...    rows = quintuples of one split, sorted by (volume id, question id)
      data/validation-…  data/test-…           (kneeprep split "val" is Hugging Face's "validation")
      _volumes/train-00000-of-00004.parquet …  one row per volume (VOLUME_SCHEMA), shard for shard beside data/
      manifest.json                            written last: schema version, recipe hash, per shard paths/rows/sha256
      report.json                              the last `kneeprep shards` run's summary and rejections

**Each volume's voxels are stored once per shard.** Rows are sorted by volume; the volume's bytes sit in the
``image`` column of its *first* row only (null on its other rows, which Parquet stores in a few bits), and a
row group holds whole volumes only -- so reading one row group decodes each of its volumes exactly once, and a
shard is self-contained. Decode a volume with nothing but pyarrow, numpy (and numcodecs for Blosc)::

    if row["image_codec"] == "raw":      # codec "none", "lz4", "zstd": Parquet (de)compresses the page
        buf = row["image"]
    elif row["image_codec"] == "blosc":  # codec "blosc-lz4", "blosc-zstd": one Blosc frame, compressed by kneeprep
        buf = numcodecs.Blosc().decode(row["image"])
    np.frombuffer(buf, dtype=row["image_dtype"]).reshape(row["image_shape"])   # C order, (z, y, x)

Determinism: same quintuples, volumes and recipe give byte-identical files (stable sort orders, no
timestamps, fixed writer options). Each file is written under a temporary name and renamed; the manifest comes last, so
a directory without ``manifest.json`` is not a complete set of shards.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from numcodecs import Blosc, blosc

from kneeprep.errors import ValidationError

#: Version of the shard schema and layout; bump on any change a reader could notice.
SCHEMA_VERSION = 3  # 2: the image_codec column (Blosc-compressed volumes); 3: Hub layout + volumes table
#: manifest versions a reader still reads (2: ``<split>/part-NNNNN.parquet``, no volumes table; same rows)
READABLE_VERSIONS = (2, 3)
#: A row group holds whole volumes up to this many uncompressed image bytes (at least one volume). A full DESS
#: volume (160x384x384 uint16, 45 MiB) gets a row group of its own: reading is as fast as with bigger groups
#: (the cost is decoding the voxel bytes; bench/bench_loader.py), and the loader's unit of shuffling and of
#: memory stays one volume. Small fixed-shape volumes (32x256x256 float32, 8 MiB) go 8 to a group.
ROW_GROUP_IMAGE_BYTES = 64 * 1024 * 1024
MANIFEST = "manifest.json"
REPORT = "report.json"

_GRADE = pa.struct(
    [
        pa.field("finding", pa.string()),
        pa.field("region", pa.string()),
        pa.field("component", pa.string()),
        pa.field("grade", pa.int16()),
    ]
)

#: The Arrow schema of every shard. Every batch is cast to it before writing.
SCHEMA = pa.schema(
    [
        # ids
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("volume_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        # question
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("question_type", pa.string(), nullable=False),
        pa.field("question_region", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        # box (null when box_empty; box_reason says why)
        pa.field("box_region", pa.string()),
        pa.field("box_voxels", pa.list_(pa.int32(), 6)),
        pa.field("box_list_form", pa.list_(pa.int32(), 6)),
        pa.field("box_normalized", pa.list_(pa.float64(), 6)),
        pa.field("box_size_mm", pa.list_(pa.float64(), 3)),
        pa.field("box_center_lps", pa.list_(pa.float64(), 3)),
        pa.field("box_empty", pa.bool_(), nullable=False),
        pa.field("box_reason", pa.string()),
        # reasoning and severity
        pa.field("reasoning", pa.list_(pa.string()), nullable=False),
        pa.field("severity", pa.list_(_GRADE), nullable=False),
        pa.field("answer_json", pa.string(), nullable=False),
        # the volume: bytes on the volume's first row in the shard only
        pa.field("image", pa.large_binary()),
        pa.field("image_shape", pa.list_(pa.int32(), 3), nullable=False),
        pa.field("image_dtype", pa.string(), nullable=False),
        pa.field("image_codec", pa.string(), nullable=False),
        pa.field("image_spacing", pa.list_(pa.float64(), 3), nullable=False),
        pa.field("image_affine_lps", pa.list_(pa.float64(), 16), nullable=False),
    ],
    metadata={
        "kneeprep.schema_version": str(SCHEMA_VERSION),
        "kneeprep.layout": "rows sorted by volume; image bytes on each volume's first row; whole volumes per row group",
        "kneeprep.image_decoding": (
            "image_codec 'raw': np.frombuffer(image, image_dtype).reshape(image_shape), C order (z, y, x); "
            "'blosc': the same on numcodecs.Blosc().decode(image)"
        ),
    },
)
#: The volumes table (``_volumes/``): one row per volume, the same ``image`` bytes as the volume's first row in
#: its quintuples shard, and ``image_nbytes`` = their length (a reader that strips trailing NUL bytes, such as
#: ``datasets``' numpy formatting of binary values, pads back to it: :func:`kneeprep.hf.decode_volume`).
VOLUME_SCHEMA = pa.schema(
    [
        pa.field("volume_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("questions", pa.int32(), nullable=False),
        pa.field("image", pa.large_binary(), nullable=False),
        pa.field("image_nbytes", pa.int64(), nullable=False),
        *(
            SCHEMA.field(n)
            for n in ("image_shape", "image_dtype", "image_codec", "image_spacing", "image_affine_lps")
        ),
    ],
    metadata={
        "kneeprep.schema_version": str(SCHEMA_VERSION),
        "kneeprep.layout": "one row per volume, sorted by volume id; join quintuples on volume_id",
        "kneeprep.image_decoding": SCHEMA.metadata[b"kneeprep.image_decoding"].decode(),
    },
)
IMAGE_COLUMNS = ("image", "image_shape", "image_dtype", "image_codec", "image_spacing", "image_affine_lps")
QUINTUPLE_COLUMNS = tuple(n for n in SCHEMA.names if n not in IMAGE_COLUMNS)
#: recipe ``shards.codec`` -> Parquet compression of the ``image`` column (Blosc codecs compress the bytes first).
PARQUET_CODECS = {"none": "NONE", "lz4": "LZ4", "zstd": "ZSTD", "blosc-lz4": "NONE", "blosc-zstd": "NONE"}
#: ``image_codec`` values: "raw" = the C-order voxel bytes; "blosc" = one Blosc (c-blosc 1.x) frame of them.
IMAGE_CODECS = ("raw", "blosc")
#: recipe codec -> (Blosc compressor, block size in bytes). Always bit-shuffle with typesize = itemsize, level =
#: recipe ``level``. zstd needs big blocks to decode fast (1 MiB: 4x faster than Blosc's automatic 64-256 KiB,
#: and 5 % smaller); lz4 is fastest at 256 KiB (Blosc's own choice at level 5). Fixed here so the bytes do not
#: depend on Blosc's heuristics (bench/bench_loader.py, docs/SHARDS.md "Compression").
_BLOSC = {"blosc-lz4": ("lz4", 256 * 1024), "blosc-zstd": ("zstd", 1024 * 1024)}


def encode_image(img: np.ndarray, codec: str, level: int = 3) -> tuple[bytes, str]:
    """The ``image`` bytes and ``image_codec`` of a C-contiguous little-endian volume for recipe ``codec``.

    Blosc codecs: one Blosc frame, bit-shuffled with typesize = itemsize, compressed on one thread (c-blosc's
    threads write blocks in completion order, so multithreaded output is not byte-identical run to run).
    """
    if codec not in _BLOSC:
        return img.tobytes(), "raw"
    cname, blocksize = _BLOSC[codec]
    if img.nbytes > 2**31 - 2**10:
        raise ValidationError(
            f"a {img.nbytes}-byte volume is too big for one Blosc frame (2 GiB); use codec zstd"
        )
    previous, blosc.use_threads = blosc.use_threads, False
    try:
        return Blosc(cname, clevel=level, shuffle=Blosc.BITSHUFFLE, blocksize=blocksize).encode(img), "blosc"
    finally:
        blosc.use_threads = previous


def decode_image(
    image: bytes | pa.Buffer | pa.Scalar, dtype: str, shape, codec: str = "raw", out: np.ndarray | None = None
) -> np.ndarray:
    """A volume from its ``image`` bytes and ``image_codec``, read-only (shared by the samples of one volume).

    ``"raw"``: a view of the bytes, no copy. ``"blosc"``: decompressed into a new array by numcodecs (its
    threads: ``numcodecs.blosc.set_nthreads`` / ``use_threads``). With ``out`` (a writable C-contiguous array
    of ``shape`` x ``dtype``, e.g. a shared-memory slab) the volume is decoded or copied into it and ``out`` is
    returned. Raises ``ValidationError`` when the bytes do not hold ``shape`` x ``dtype``.
    """
    if isinstance(image, pa.Scalar):
        image = image.as_buffer()
    dt, shape = np.dtype(dtype), tuple(shape)
    if out is not None and (out.shape != shape or out.dtype != dt or not out.flags.c_contiguous):
        raise ValueError(f"out is {out.shape} {out.dtype}, the volume {shape} {dt}")
    if codec == "raw":
        got, need = memoryview(image).nbytes, math.prod(shape) * dt.itemsize
        if got != need:
            raise ValidationError(f"{got} image bytes, shape {list(shape)} x {dtype} needs {need}")
        a = np.frombuffer(image, dtype=dt).reshape(shape)
        if out is not None:
            np.copyto(out, a)
            a = out
    elif codec == "blosc":
        a = np.empty(shape, dt) if out is None else out
        nbytes, cbytes = _blosc_sizes(image)
        if nbytes != a.nbytes or cbytes != memoryview(image).nbytes:
            raise ValidationError(
                f"Blosc frame of {memoryview(image).nbytes} bytes says {nbytes} bytes in {cbytes}; "
                f"shape {list(shape)} x {dtype} needs {a.nbytes}"
            )
        try:
            blosc.decompress(image, a)
        except (RuntimeError, ValueError) as e:
            raise ValidationError(f"Blosc frame does not decode: {e}") from e
    else:
        raise ValidationError(f"image_codec {codec!r} is not one of {', '.join(IMAGE_CODECS)}")
    a.flags.writeable = False  # shared by the samples of one volume
    return a


def _blosc_sizes(frame) -> tuple[int, int]:
    """(uncompressed, compressed) bytes from a Blosc 1 frame's 16-byte header (0, 0 when too short)."""
    head = bytes(memoryview(frame)[:16])
    if len(head) < 16:
        return 0, 0
    return int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
