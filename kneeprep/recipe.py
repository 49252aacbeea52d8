"""Recipes: every choice a build makes, read from TOML into frozen dataclasses.

A recipe file has the sections below; every key is optional and falls back to the default shown by
``kneeprep recipe show``. Unknown sections or keys and bad values raise :class:`~kneeprep.errors.RecipeError`
naming the key (``geometry.spacing: expected 3 positive numbers, got [0.7, 0]``).

Each stage depends on some sections only; :meth:`Recipe.stage_hash` hashes exactly those, so changing a
shard setting does not re-convert volumes. ``Recipe.hash`` covers everything and goes into provenance.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kneeprep.dicom.qc import QC  # the series checklist's tolerances belong to the reader
from kneeprep.errors import RecipeError
from kneeprep.moaks.anatomy import DEFAULT_QUESTION_REGIONS, SAMPLE_LABELS, SAMPLE_REGION_GROUPS
from kneeprep.recipes import resolve

_ORIENT_RE = re.compile(r"^(?=.*[LR])(?=.*[AP])(?=.*[SI])[LRAPSI]{3}$")


@dataclass(frozen=True)
class Select:
    """Which series to convert."""

    #: regex matched (``re.search``) against SeriesDescription (0008,103E).
    series_description: str = r"^SAG_3D_DESS_(RIGHT|LEFT)$"
    #: "ok": only series whose QC verdict is ok; "warn": also those with warnings. Failed never convert.
    min_qc: str = "warn"
    #: a series split into image sets (echoes, time points, b-values, magnitude/phase; volume id suffix
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


@dataclass(frozen=True)
class Recipe:
    name: str = "default"
    description: str = ""
    select: Select = field(default_factory=Select)
    qc: QC = field(default_factory=QC)
    geometry: GeometrySpec = field(default_factory=GeometrySpec)
    intensity: Intensity = field(default_factory=Intensity)
    masks: Masks = field(default_factory=Masks)
    labels: Labels = field(default_factory=Labels)
    boxes: Boxes = field(default_factory=Boxes)
    #: question id -> region name (None / "" = no box for this question).
    questions: dict[str, str | None] = field(default_factory=lambda: dict(DEFAULT_QUESTION_REGIONS))
    shards: Shards = field(default_factory=Shards)
    splits: Splits = field(default_factory=Splits)
    privacy: Privacy = field(default_factory=Privacy)
    source_path: str | None = field(default=None, compare=False)

    # -- hashing --------------------------------------------------------------------------------------
    STAGES = {
        # privacy acts where ids are published (shards, card, export), not on the volume store
        "convert": ("select", "qc", "geometry", "intensity", "masks", "labels"),
        "boxes": ("labels", "boxes"),
        "shards": ("questions", "shards", "splits", "privacy"),
    }

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source_path")
        d["labels"]["map"] = {str(k): v for k, v in sorted(self.labels.map.items())}
        d["labels"]["regions"] = {k: list(v) for k, v in sorted(self.labels.regions.items())}
        return json.loads(json.dumps(d))  # tuples -> lists

    def _hashed(self) -> dict[str, Any]:
        d = self.to_json()
        if d["select"]["image_sets"] == "all":  # the default: recipes written before it keep their hashes
            del d["select"]["image_sets"]
        return d

    @property
    def hash(self) -> str:
        return _hash(self._hashed())

    def stage_hash(self, stage: str) -> str:
        """Hash of the sections ``stage`` ("convert", "boxes", "shards") depends on."""
        d = self._hashed()
        parts = {k: d[k] for k in self.STAGES[stage]}
        if stage == "convert" and self.privacy.keep_free_text:  # the one privacy setting the store depends on
            parts["privacy.keep_free_text"] = True
        return _hash(parts)

    def to_toml(self) -> str:
        """The resolved recipe as TOML (all defaults filled in)."""
        return _to_toml(self.to_json())


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# parsing


def load_recipe(path: str | Path | None) -> Recipe:
    """Read a recipe file, or a packaged recipe by name (``"3dreasonknee"``, see :mod:`kneeprep.recipes`);
    ``None`` gives the defaults."""
    if path is None:
        return Recipe()
    p = resolve(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{p}: not valid TOML: {e}") from e
    try:
        r = parse_recipe(data)
    except RecipeError as e:
        raise RecipeError(*(f"{p}: {m}" for m in e.problems)) from None
    return _with(r, source_path=str(p))


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """Build a :class:`Recipe` from a parsed TOML mapping, checking every key."""
    data = dict(data)
    top = data.pop("recipe", {})
    _check_keys("recipe", top, {"name", "description"})
    kw: dict[str, Any] = {
        "name": _str("recipe.name", top.get("name", "default")),
        "description": _str("recipe.description", top.get("description", "")),
    }
    simple = {
        "select": Select,
        "qc": QC,
        "geometry": GeometrySpec,
        "intensity": Intensity,
        "masks": Masks,
        "boxes": Boxes,
        "shards": Shards,
        "splits": Splits,
        "privacy": Privacy,
    }
    # every problem is reported, not only the first (a section that fails keeps its defaults)
    errors: list[str] = []
    for section, value in data.items():
        try:
            if section in simple:
                kw[section] = _parse_section(section, simple[section], value)
            elif section == "labels":
                kw["labels"] = _parse_labels(value)
            elif section == "questions":
                kw["questions"] = _parse_questions(value)
            else:
                raise RecipeError(
                    f"unknown section [{section}] (known: recipe, {', '.join([*simple, 'labels', 'questions'])})"
                )
        except RecipeError as e:
            errors += e.problems
    r = Recipe(**kw)
    errors += _validate(r)
    if errors:
        raise RecipeError(*errors)
    return r


def _check_keys(section: str, value: Any, allowed: set[str]) -> None:
    if not isinstance(value, dict):
        raise RecipeError(f"[{section}] must be a table, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            raise RecipeError(f"{section}.{k}: unknown key (known: {', '.join(sorted(allowed))})")


def _parse_section(section: str, cls, value: dict) -> Any:
    names = {f.name: f for f in fields(cls)}
    _check_keys(section, value, set(names))
    kw = {}
    defaults = cls()
    for k, v in value.items():
        default = getattr(defaults, k)
        key = f"{section}.{k}"
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise RecipeError(f"{key}: expected true or false, got {v!r}")
        elif isinstance(default, int):
            if isinstance(v, bool) or not isinstance(v, int):
                raise RecipeError(f"{key}: expected an integer, got {v!r}")
        elif isinstance(default, float):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise RecipeError(f"{key}: expected a number, got {v!r}")
            v = float(v)
        elif isinstance(default, str):
            v = _str(key, v)
        elif isinstance(default, tuple):
            if not isinstance(v, list):
                raise RecipeError(f"{key}: expected a list, got {v!r}")
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise RecipeError(f"{key}: expected a string, got {v!r}")
    return v


def _parse_labels(value: Any) -> Labels:
    _check_keys("labels", value, {"map", "regions"})
    kw = {}
    if "map" in value:
        m = {}
        _check_keys(
            "labels.map", value["map"], set(value["map"]) if isinstance(value["map"], dict) else set()
        )
        for k, name in value["map"].items():
            try:
                lid = int(k)
            except ValueError:
                raise RecipeError(f"labels.map.{k}: label ids must be integers, got {k!r}") from None
            if not 0 < lid < 65536:
                raise RecipeError(f"labels.map.{k}: label id must be in 1..65535 (0 is background)")
            m[lid] = _str(f"labels.map.{k}", name)
        kw["map"] = m
    if "regions" in value:
        regs = value["regions"]
        _check_keys("labels.regions", regs, set(regs) if isinstance(regs, dict) else set())
        out = {}
        for name, members in regs.items():
            if not isinstance(members, list) or not all(isinstance(x, str) for x in members) or not members:
                raise RecipeError(
                    f"labels.regions.{name}: expected a non-empty list of label names, got {members!r}"
                )
            out[name] = tuple(members)
        kw["regions"] = out
    return Labels(**kw)


def _parse_questions(value: Any) -> dict[str, str | None]:
    _check_keys("questions", value, set(value) if isinstance(value, dict) else set())
    out = dict(DEFAULT_QUESTION_REGIONS)
    for qid, region in value.items():
        out[str(qid)] = _str(f"questions.{qid}", region) or None
    return out


_CHOICES = {
    "select.min_qc": ("ok", "warn"),
    "geometry.interpolator": ("linear", "bspline", "nearest"),
    "intensity.method": ("none", "percentile", "zscore", "window"),
    "intensity.dtype": ("", "uint8", "uint16", "int16", "float32"),
    "shards.codec": ("zstd", "lz4", "none", "blosc-lz4", "blosc-zstd"),
    "splits.source": ("csv", "generated"),
}


def _validate(r: Recipe) -> list[str]:
    """Every problem of the values (each names its key); empty when the recipe is valid."""
    errs: list[str] = []
    d = r.to_json()
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        if d[section][name] not in choices:
            errs.append(f"{key}: expected one of {', '.join(map(repr, choices))}, got {d[section][name]!r}")
    for key, value in (
        ("series_description", r.select.series_description),
        ("image_sets", r.select.image_sets),
    ):
        try:
            re.compile(value)
        except re.error as e:
            errs.append(f"select.{key}: not a valid regex (nor 'all' / 'first'): {e}")
    g = r.geometry
    if g.orientation != "native" and not _ORIENT_RE.match(g.orientation):
        errs.append(
            f"geometry.orientation: expected 'native' or an ITK code of three letters from L/R, A/P, S/I "
            f"(e.g. 'LPS'), got {g.orientation!r}"
        )
    if g.spacing and (
        len(g.spacing) != 3 or not all(isinstance(v, int | float) and v > 0 for v in g.spacing)
    ):
        errs.append(
            f"geometry.spacing: expected [] or 3 positive numbers (z, y, x) in mm, got {list(g.spacing)}"
        )
    if g.shape and (
        len(g.shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in g.shape)
    ):
        errs.append(f"geometry.shape: expected [] or 3 positive integers (z, y, x), got {list(g.shape)}")
    i = r.intensity
    if i.method == "percentile" and not 0 <= i.lower < i.upper <= 100:
        errs.append(
            f"intensity.lower/upper: percentiles need 0 <= lower < upper <= 100, got {i.lower}, {i.upper}"
        )
    if i.method == "window" and not i.lower < i.upper:
        errs.append(f"intensity.lower/upper: window needs lower < upper, got {i.lower}, {i.upper}")
    if i.method == "zscore" and i.dtype not in ("", "float32"):
        errs.append(f"intensity.dtype: zscore gives float32, got {i.dtype!r}")
    if r.boxes.margin_mm < 0:
        errs.append(f"boxes.margin_mm: must be >= 0, got {r.boxes.margin_mm}")
    if r.shards.target_bytes < 1:
        errs.append(f"shards.target_bytes: must be positive, got {r.shards.target_bytes}")
    if r.shards.codec.startswith("blosc-") and not 1 <= r.shards.level <= 9:
        errs.append(f"shards.level: Blosc levels are 1-9, got {r.shards.level} for codec {r.shards.codec!r}")
    s = r.splits
    if len(s.ratios) != 3 or any(x < 0 for x in s.ratios) or abs(sum(s.ratios) - 1) > 1e-6:
        errs.append(
            f"splits.ratios: expected 3 non-negative numbers summing to 1 (train, val, test), got {list(s.ratios)}"
        )
    names = set(r.labels.map.values())
    if len(names) != len(r.labels.map):
        errs.append("labels.map: label names must be unique")
    for region, members in r.labels.regions.items():
        for m in members:
            if m not in names:
                errs.append(f"labels.regions.{region}: {m!r} is not a label name in labels.map")
    if any(e.startswith("labels.") for e in errs):
        return errs  # question regions are checked against [labels] only once [labels] itself is valid
    regions = set(r.labels.region_labels())
    for qid, region in r.questions.items():
        if region is not None and region not in regions:
            errs.append(f"questions.{qid}: region {region!r} is neither a label nor a region in [labels]")
    return errs


def _with(r: Recipe, **changes) -> Recipe:
    return replace(r, **changes)


# ----------------------------------------------------------------------------------------------------------
# TOML output (for `recipe show`)


def _toml_value(v: Any) -> str:
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _to_toml(d: dict[str, Any]) -> str:
    lines = [
        "[recipe]",
        f"name = {_toml_value(d['name'])}",
        f"description = {_toml_value(d['description'])}",
        "",
    ]

    def table(name: str, t: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = []
        for k, v in t.items():
            if isinstance(v, dict):
                subs.append((k, v))
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        lines.append("")
        for k, v in subs:
            table(f"{name}.{k}", v)

    for k, v in d.items():
        if isinstance(v, dict):
            table(k, v)
    return "\n".join(lines)
