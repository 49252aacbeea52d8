"""The dataset card: ``SHARDS/README.md``, written beside the shards and their manifest.

It says what the shards hold (counts per split and per finding), how to read them (the schema, and how a
volume decodes without kneeprep), how they were made (recipe, versions, hashes) and under which terms
(annotations CC-BY-4.0; images under the OAI data use agreement, not redistributable).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from kneeprep import __version__
from kneeprep.files import sha256_file, write_text
from kneeprep.formats.card_yaml import front_matter
from kneeprep.formats.shard_reader import read_manifest
from kneeprep.formats.shard_schema import SCHEMA, VOLUME_SCHEMA
from kneeprep.moaks.anatomy import FINDINGS

CARD = "README.md"

LICENCE = """\
- **Annotations** (questions, reasoning, MOAKS grades, boxes derived from masks): 3DReasonKnee, CC-BY-4.0.
- **Images**: derived from Osteoarthritis Initiative (OAI) MRI, available only under the OAI
  data use agreement. These shards contain image voxels: **do not redistribute them**; share the recipe and let others
  rebuild with kneeprep from their own OAI download.
- Patient identifiers are OAI participant ids (already de-identified by OAI){pseudo}. No other DICOM patient
  field (name, birth date, address, accession number, institution) is stored."""


def write_card(shards_dir: str | os.PathLike, recipe, *, extra: dict | None = None) -> Path:
    """Write ``shards_dir/README.md`` from the manifest, the shards' question columns and the recipe: the
    Hugging Face YAML block first (:func:`kneeprep.formats.card_yaml.front_matter`), then the card."""

    d = Path(shards_dir)
    manifest = read_manifest(d)
    per_split: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    patients: dict[str, set] = collections.defaultdict(set)
    boxed: collections.Counter = collections.Counter()
    for e in manifest["shards"]:
        t = pq.read_table(d / e["path"], columns=["split", "question_type", "patient_id", "box_empty"])
        for split, qtype, pid, empty in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
            per_split[split][qtype] += 1
            patients[split].add(pid)
            boxed[split] += not empty
    splits = [s for s in ("train", "val", "test") if s in manifest["splits"]]
    lines = [
        front_matter(manifest, f"3DReasonKnee-style knee MRI quintuples ({recipe.name})"),
        f"# Dataset card: {recipe.name}",
        "",
        "3DReasonKnee-style quintuples — (3D volume, question about a MOAKS subregion, 3D box of that region, "
        "reasoning steps, MOAKS grades) — rebuilt from OAI knee MRI with "
        f"[kneeprep](https://github.com/) {__version__}.",
        "",
        "## Counts",
        "",
        "| split | quintuples | with a box | volumes | patients | shards | MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in splits:
        m = manifest["splits"][s]
        files = [e for e in manifest["shards"] if e["split"] == s]
        mib = sum(e["bytes"] for e in files) / 2**20
        lines.append(
            f"| {s} | {m['rows']} | {boxed[s]} | {m['volumes']} | {len(patients[s])} | {len(files)} | {mib:.1f} |"
        )
    lines += [
        "",
        "Quintuples per finding:",
        "",
        "| finding | " + " | ".join(splits) + " |",
        "|---|" + "---:|" * len(splits),
    ]
    for f in FINDINGS:
        if any(per_split[s][f] for s in splits):
            lines.append(f"| {f} | " + " | ".join(str(per_split[s][f]) for s in splits) + " |")
    lines += [
        "",
        "Splits are by patient: no patient appears in two splits (`kneeprep validate` checks it).",
        "",
        "## Reading the shards",
        "",
        "Files (the Hugging Face Hub layout; kneeprep's split `val` is `validation` in file names and configs): "
        "`data/<split>-NNNNN-of-NNNNN.parquet`, config `quintuples` (default), one row per quintuple; "
        "`_volumes/<split>-NNNNN-of-NNNNN.parquet`, config `volumes`, one row per volume (`image`, `image_nbytes` "
        "and the geometry; join on `volume_id`). Both are listed with row counts and SHA-256 checksums in "
        "`manifest.json`. In `data/`, each volume's voxels are also stored once per shard, on the first row of "
        "that volume (`image` is null on its other rows; what kneeprep's loader reads). `image_codec` says how "
        "`image` decodes: `raw` = the voxel bytes (C order); `blosc` = one Blosc frame of them, decoded by "
        "`numcodecs.Blosc().decode` (`pip install numcodecs`; it comes with zarr).",
        "",
        "```python",
        "import datasets, kneeprep.hf",
        'ds = datasets.load_dataset("SHARDS")                        # train / validation / test quintuples',
        'vols = kneeprep.hf.Volumes("SHARDS", split="train")        # decoded (z, y, x) arrays by volume id, cached',
        'ds = ds["train"].with_transform(kneeprep.hf.with_volumes(vols))   # rows get their "volume" lazily',
        "```",
        "",
        "Parquet tools: point them at `data/` (quintuples) or `_volumes/` (volumes): "
        '`pandas.read_parquet("SHARDS/data")`, `pyarrow.dataset.dataset("SHARDS/data")`, '
        '`duckdb.sql("SELECT * FROM \'SHARDS/data/*.parquet\'")`, `polars.read_parquet("SHARDS/data/*.parquet")`; '
        'at the root, `pyarrow.dataset.dataset("SHARDS", format="parquet", exclude_invalid_files=True)` '
        "gives the quintuples (it skips `_volumes/` and the JSON and Markdown files). Without kneeprep:",
        "",
        "```python",
        "import numcodecs, numpy as np, pyarrow.parquet as pq",
        'v = pq.read_table("_volumes/train-00000-of-00001.parquet").to_pylist()[0]',
        'data = numcodecs.Blosc().decode(v["image"]) if v["image_codec"] == "blosc" else v["image"]',
        'volume = np.frombuffer(data, v["image_dtype"]).reshape(v["image_shape"])',
        "```",
        "",
        'With kneeprep: `kneeprep.loader.dataset.ShardDataset(path, split="train")` (shuffling, exact partitioning over '
        "ranks and workers, resumable). Boxes: `box_voxels` is half-open `[z0, y0, x0, z1, y1, x1]` in array "
        "order; `box_list_form` the 3DReasonKnee `[start_slice, end_slice, x_min, x_max, y_min, y_max]` "
        "(inclusive). World coordinates: `image_affine_lps` (row-major 4×4, LPS mm).",
        "",
        f"Schema (version {manifest.get('schema_version')}), quintuples:",
        "",
        "| column | type |",
        "|---|---|",
    ]
    lines += [f"| `{f.name}` | `{f.type}`{'' if f.nullable else ' (not null)'} |" for f in SCHEMA]
    lines += ["", "Volumes:", "", "| column | type |", "|---|---|"]
    lines += [f"| `{f.name}` | `{f.type}`{'' if f.nullable else ' (not null)'} |" for f in VOLUME_SCHEMA]
    prov = {
        "kneeprep_version": __version__,
        "recipe_name": recipe.name,
        "recipe_hash": recipe.hash,
        "shards_stage_hash": recipe.stage_hash("shards"),
        "convert_stage_hash": recipe.stage_hash("convert"),
        "boxes_stage_hash": recipe.stage_hash("boxes"),
        "inputs_hash": manifest.get("inputs_hash"),
        "manifest_sha256": sha256_file(d / "manifest.json"),
        **(extra or {}),
    }
    pseudo = (
        " — here further replaced by keyed hashes (recipe `privacy.pseudonymize_ids`)"
        if recipe.privacy.pseudonymize_ids
        else ""
    )
    lines += [
        "",
        "## Provenance",
        "",
        "```json",
        json.dumps(prov, indent=1),
        "```",
        "",
        "## Licence and terms",
        "",
        LICENCE.format(pseudo=pseudo),
        "",
        "## Recipe",
        "",
        "```toml",
        recipe.to_toml().rstrip(),
        "```",
        "",
    ]
    return write_text(d / CARD, "\n".join(lines))
