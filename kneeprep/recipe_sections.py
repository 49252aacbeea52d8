"""The recipe's sections: one frozen dataclass per TOML section (``[select]``, ``[geometry]``, ``[intensity]``,
``[masks]``, ``[labels]``, ``[boxes]``, ``[shards]``, ``[splits]``, ``[privacy]``), each field with its default
and what it means. ``[qc]`` is :class:`kneeprep.dicom.qc.QC` (the series checklist's tolerances belong to the
reader); ``[questions]`` is a plain mapping on :class:`kneeprep.recipe_model.Recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kneeprep.moaks.anatomy import SAMPLE_LABELS, SAMPLE_REGION_GROUPS


@dataclass(frozen=True)
class Select:
    """Which series to convert."""

    #: regex matched (``re.search``) against SeriesDescription (0008,103E).
    series_description: str = r"^SAG_3D_DESS_(RIGHT|LEFT)$"
    #: "ok": only series whose QC verdict is ok; "warn": also those with warnings. Failed never convert.
    min_qc: str = "warn"
    #: a series split into image sets (echoes, time points, b-values, magnitude/phase, acquisitions; volume id suffix
    #: ``_e2`` ...): "all" converts every set, "first" only the first (lowest echo, time, b-value), anything
    #: else is a regex matched in full against the suffix (``"e1|e2"``, ``"b0|b1000-d.*"``).
    image_sets: str = "all"


@dataclass(frozen=True)
class GeometrySpec:
    """Orientation, grid and mirroring of the stored volumes."""

    #: "native" (as acquired) or an ITK code such as "LPS", "PIR" (see kneeprep.geometry).
    orientation: str = "native"
    #: target spacing in mm, array order (z, y, x); empty = keep.
    spacing: tuple[float, ...] = ()
    #: target shape, array order; empty = keep. With spacing empty, the field of view is kept.
    shape: tuple[int, ...] = ()
    #: mirror left knees (side 2) across the sagittal plane so they look like right knees.
    mirror_left: bool = False
    #: image interpolator when resampling: "linear", "bspline" or "nearest". Masks are always nearest.
    interpolator: str = "linear"


@dataclass(frozen=True)
class Intensity:
    """Intensity normalization.

    * ``none``: DICOM values after RescaleSlope/Intercept, unchanged, stored as ``dtype`` if given, else as
      the smallest integer type that holds them (float32 if not integral).
    * ``percentile``: clip at the ``lower``/``upper`` percentiles, scale linearly to the full range of
      ``dtype`` (``[0, 1]`` for float dtypes).
    * ``zscore``: subtract the mean, divide by the standard deviation (float32).
    * ``window``: clip to ``[lower, upper]`` in DICOM units, scale like ``percentile``.
    """

    method: str = "none"
    lower: float = 0.5
    upper: float = 99.5
    dtype: str = ""


@dataclass(frozen=True)
class Masks:
    """Where segmentation masks come from."""

    #: a path pattern with ``{volume_id}``, ``{patient_id}``, ``{time}``, ``{knee_side}`` ... relative to
    #: the masks directory; empty = use the split CSVs' ``label_filepath`` column.
    pattern: str = ""
    #: the label layer's name: stored as ``labels/<name>`` in the volume group.
    name: str = "anatomy"


@dataclass(frozen=True)
class Labels:
    """The label map (id -> name) and named regions (name -> label names)."""

    map: dict[int, str] = field(default_factory=lambda: dict(SAMPLE_LABELS))
    regions: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(SAMPLE_REGION_GROUPS))

    def region_labels(self) -> dict[str, tuple[int, ...]]:
        """Every region with its label ids: each label is a region of its own name, plus the groups."""
        by_name = {name: lid for lid, name in self.map.items()}
        out = {name: (lid,) for lid, name in sorted(self.map.items())}
        for region, members in self.regions.items():
            out[region] = tuple(sorted(by_name[m] for m in members))
        return out


@dataclass(frozen=True)
class Boxes:
    #: margin added on every side, in mm, clipped to the volume.
    margin_mm: float = 0.0


@dataclass(frozen=True)
class Shards:
    #: uncompressed voxel bytes per shard (a shard holds whole volumes with all their quintuples; boundaries are
    #: planned from the volumes' shapes and dtypes before writing, so a compressed shard file is smaller).
    target_bytes: int = 512 * 1024 * 1024
    #: how the voxel column is compressed (docs/SHARDS.md, "Compression"; measured in bench/bench_loader.py):
    #: "none" (the fast layout: memory-mapped, zero-copy), "blosc-lz4" / "blosc-zstd" (compact layouts: kneeprep
    #: compresses each volume as one bit-shuffled Blosc frame that decodes on several threads, ``image_codec`` =
    #: "blosc", readable with ``numcodecs.Blosc().decode``), or the Parquet page codecs "zstd", "lz4" (one
    #: thread per volume; kept for existing recipes).
    codec: str = "zstd"
    #: the level: zstd's (1-22) for "zstd", Blosc's clevel (1-9) for the Blosc codecs; ignored by "lz4", "none".
    level: int = 3


@dataclass(frozen=True)
class Splits:
    #: "csv": splits from the published split CSVs; "generated": by patient from seed and ratios.
    source: str = "csv"
    seed: int = 0
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Privacy:
    #: replace patient ids in every output by a keyed hash (HMAC-SHA256, key from env var ``key_env``).
    pseudonymize_ids: bool = False
    key_env: str = "KNEEPREP_ID_KEY"
    #: write the series' SeriesDescription and StudyDescription (free text) into volume attrs and reports
    keep_free_text: bool = False
