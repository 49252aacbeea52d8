"""Recipes: every choice a build makes, read from TOML into frozen dataclasses.

A recipe file has the sections below; every key is optional and falls back to the default shown by
``kneeprep recipe show``. Unknown sections or keys and bad values raise :class:`~kneeprep.errors.RecipeError`
naming the key (``geometry.spacing: expected 3 positive numbers, got [0.7, 0]``).

This module reads and checks recipes (:func:`load_recipe`, :func:`parse_recipe`); the dataclass of each
section is in :mod:`kneeprep.recipe_sections`, the :class:`Recipe` with its per-stage hashes and TOML form in
:mod:`kneeprep.recipe_model`. Every name callers use imports from here.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from kneeprep.dicom.qc import QC  # the series checklist's tolerances belong to the reader
from kneeprep.errors import RecipeError
from kneeprep.moaks.anatomy import DEFAULT_QUESTION_REGIONS
from kneeprep.recipe_model import Recipe
from kneeprep.recipe_sections import (
    Boxes,
    GeometrySpec,
    Intensity,
    Labels,
    Masks,
    Privacy,
    Select,
    Shards,
    Splits,
)
from kneeprep.recipes import resolve

_ORIENT_RE = re.compile(r"^(?=.*[LR])(?=.*[AP])(?=.*[SI])[LRAPSI]{3}$")


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


__all__ = [  # the sections and the Recipe are re-exported: callers import every recipe name from here
    "QC",
    "Boxes",
    "GeometrySpec",
    "Intensity",
    "Labels",
    "Masks",
    "Privacy",
    "Recipe",
    "Select",
    "Shards",
    "Splits",
    "load_recipe",
    "parse_recipe",
]
