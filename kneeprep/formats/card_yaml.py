"""The YAML front matter of the dataset card: what the Hugging Face Hub and ``datasets.load_dataset`` read.

Two configs over the same shards directory (``docs/SHARDS.md``, "Layout"):

* ``quintuples`` (default): ``data/<split>-*.parquet``, one row per quintuple, :data:`SCHEMA`;
* ``volumes``: ``_volumes/<split>-*.parquet``, one row per volume, :data:`VOLUME_SCHEMA`.

Splits are Hugging Face's names (:data:`kneeprep.formats.shard_plan.HF_SPLITS`: kneeprep's ``val`` is
``validation``). Features are written from the Arrow schemas in the ``datasets`` YAML form (``dtype``,
``list`` + ``length`` for fixed-size lists, a list of fields for structs), so the card needs no ``datasets``.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from kneeprep.formats.shard_plan import DATA_DIR, HF_SPLITS, VOLUMES_DIR
from kneeprep.formats.shard_schema import SCHEMA, VOLUME_SCHEMA

LICENSE = "cc-by-4.0"
TASK_CATEGORIES = ("visual-question-answering", "question-answering")
TAGS = ("medical", "mri", "knee", "3d", "moaks", "osteoarthritis")
CONFIGS = (("quintuples", DATA_DIR, SCHEMA), ("volumes", VOLUMES_DIR, VOLUME_SCHEMA))


def hf_feature(t: pa.DataType) -> dict[str, Any]:
    """One Arrow type as a ``datasets`` feature in its YAML form (without the ``name`` key)."""
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = hf_feature(t.value_type)
        out = {"list": inner["dtype"] if set(inner) == {"dtype"} else inner.get("struct", inner)}
        if pa.types.is_fixed_size_list(t):
            out["length"] = t.list_size
        return out
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **hf_feature(f.type)} for f in t]}
    names = {pa.string(): "string", pa.large_binary(): "large_binary", pa.binary(): "binary", pa.bool_(): "bool",
             pa.float64(): "float64", pa.float32(): "float32"}  # fmt: skip
    return {"dtype": names.get(t, str(t))}  # int16, int32, int64 are spelled the same


def hf_features(schema: pa.Schema) -> list[dict[str, Any]]:
    out = []
    for f in schema:
        feat = hf_feature(f.type)
        if "struct" in feat and set(feat) == {"struct"}:
            feat = {"struct": feat["struct"]}
        out.append({"name": f.name, **feat})
    return out


def front_matter(manifest: dict[str, Any], pretty_name: str) -> str:
    """The ``---`` block: licence, task categories, pretty name, ``configs`` (data files per split) and
    ``dataset_info`` (features, and examples and bytes per split from the manifest)."""
    splits = [s for s in HF_SPLITS if manifest["splits"].get(s, {}).get("shards")]
    configs, infos = [], []
    for i, (name, folder, schema) in enumerate(CONFIGS):
        configs.append(
            {"config_name": name, **({"default": True} if i == 0 else {}),
             "data_files": [{"split": HF_SPLITS[s], "path": f"{folder}/{HF_SPLITS[s]}-*.parquet"} for s in splits]}
        )  # fmt: skip
        count, size = ("rows", "bytes") if name == "quintuples" else ("volumes", "volumes_bytes")
        infos.append(
            {"config_name": name, "features": hf_features(schema),
             "splits": [{"name": HF_SPLITS[s], "num_examples": manifest["splits"][s][count],
                         "num_bytes": sum(e.get(size, 0) for e in manifest["shards"] if e["split"] == s)}
                        for s in splits]}
        )  # fmt: skip
    meta = {
        "pretty_name": pretty_name,
        "license": LICENSE,
        "task_categories": list(TASK_CATEGORIES),
        "tags": list(TAGS),
        "configs": configs,
        "dataset_info": infos,
    }
    return "---\n" + "".join(_yaml(k, v, 0) for k, v in meta.items()) + "---\n"


def _scalar(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)  # JSON scalars are YAML scalars (strings quoted)


def _yaml(key: str | None, v: Any, indent: int) -> str:
    """Block YAML for dicts and lists of dicts/scalars (enough for the card; strings are JSON-quoted)."""
    pad = " " * indent
    head = f"{pad}{key}:" if key is not None else ""
    if isinstance(v, dict):
        return head + "\n" + "".join(_yaml(k, x, indent + 2) for k, x in v.items())
    if isinstance(v, list):
        lines = head + "\n"
        for x in v:
            if isinstance(x, dict):
                first = True
                for k, y in x.items():
                    prefix = f"{pad}- " if first else f"{pad}  "
                    body = _yaml(k, y, indent + 2)
                    lines += (
                        prefix + body[indent + 2 :]
                        if isinstance(y, dict | list)
                        else f"{prefix}{k}: {_scalar(y)}\n"
                    )
                    first = False
            else:
                lines += f"{pad}- {_scalar(x)}\n"
        return lines
    return f"{head} {_scalar(v)}\n"
