"""The :class:`Recipe`: every section together, its JSON form, its hashes and its TOML form.

Each stage depends on some sections only; :meth:`Recipe.stage_hash` hashes exactly those, so changing a
shard setting does not re-convert volumes. ``Recipe.hash`` covers everything and goes into provenance.
:meth:`Recipe.to_toml` writes the resolved recipe with every default (``kneeprep recipe show``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from kneeprep.dicom.qc import QC  # the series checklist's tolerances belong to the reader
from kneeprep.moaks.anatomy import DEFAULT_QUESTION_REGIONS
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
