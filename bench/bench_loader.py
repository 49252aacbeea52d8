"""Loading full-size volumes for training, measured where the training loop receives them.

Same inputs for every reader: ``N_VOLUMES`` volumes of 160x384x384 uint16 (the native DESS grid; smooth
tissue-like structure plus Rician-like noise, so codecs see MR-like entropy) with ``QUESTIONS`` quintuples
each (3DReasonKnee has 494k / 7,970 = 62 per volume). Every reader runs in a torch ``DataLoader`` (0, 1 and 2
worker processes; batch 4; ``pin_memory=True``; persistent workers; one warm-up pass, then whole passes for
at least ``MIN_TIMED_S``) and the clock stops when a batch has **arrived in the main process** and the main process has read one
voxel of every 4 KiB page of each image it received that is not among the last ``RECENT`` distinct images it
read -- what a training step must at least do before the data can reach a GPU with a device cache of recent
volumes (``DeviceFeeder``; the host-to-device copy itself is not included: this machine has no GPU). Until
2026-12-02 the main process read every distinct volume of every batch again; with volumes used in place
(no copy left in the workers) that re-reading dominated and the bare rate (which never re-read) was no
longer comparable: 0.28x for uncompressed sample-major that way, in the run before this rule.

Readers:

* **kneeprep** ``make_loader`` (``TorchShardDataset``): each layout -- ``none`` (raw, memory-mapped), the
  compact ``blosc-lz4`` 5 and ``blosc-zstd`` 1, Parquet ``lz4`` and ``zstd`` 3 -- sample-major (batches of 4
  samples) and volume-major (batches of 4 volumes, each with all its quintuples). Batches carry each distinct
  volume once (``batch["volumes"]``); the main process touches those.
* **HF datasets**: a map-style dataset over an ``Array3D(uint16)`` dataset (``with_format("numpy")``), one
  sample per quintuple, each sample reading its volume row; default collate stacks the batch.
* **WebDataset**: a tar of ``.npy`` volumes; each volume decoded once and yielded once per quintuple (a worker
  takes every K-th volume); default collate.
* **np.load** of an uncompressed ``.npy`` per sample, map-style; default collate.
* **bare**: ``ShardDataset`` iterated in one process without a DataLoader, touching each distinct volume once
  (the ceiling a loader can approach).

The per-sample readers (HF, np.load) are timed on ``PER_SAMPLE_N`` samples (their rate does not depend on how
many questions a volume has). Files come from the page cache after writing (the machine has the RAM): this
measures decoding, library and transfer overhead, not the disk.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

SHAPE = (160, 384, 384)
N_VOLUMES = int(os.environ.get("KNEEPREP_BENCH_VOLUMES", "8"))
QUESTIONS = int(os.environ.get("KNEEPREP_BENCH_QUESTIONS", "60"))
PER_SAMPLE_N = 48
BATCH = 4
WORKERS = (0, 1, 2)
LAYOUTS = {
    "none": ("none", 3, "uncompressed (fast)"),
    "blosc-lz4": ("blosc-lz4", 5, "blosc-lz4 5 (compact)"),
    "blosc-zstd": ("blosc-zstd", 1, "blosc-zstd 1 (compact)"),
    "lz4": ("lz4", 3, "Parquet lz4"),
    "zstd": ("zstd", 3, "Parquet zstd 3"),
}
COMPACT = "blosc-lz4"  # the recipes' compact layout (docs/SHARDS.md, "Compression")
PAGE = 4096
RECENT = 4  # distinct images a consumer keeps (a device cache of recent volumes): touched once while kept
MIN_TIMED_S = 3.0  # timed passes repeat until this long (one pass of the slow readers already is)


def make_volume(seed: int) -> np.ndarray:
    """A knee-MR-like uint16 volume: smooth blocks of tissue intensities, edges, and noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice([0, 80, 220, 400, 650], size=(10, 24, 24), p=[0.35, 0.2, 0.2, 0.15, 0.1]).astype(
        np.float32
    )
    vol = np.kron(coarse, np.ones((16, 16, 16), np.float32))
    vol = (vol + np.roll(vol, 3, axis=1) + np.roll(vol, 3, axis=2)) / 3  # softer edges
    noise = np.hypot(rng.normal(0, 18, SHAPE).astype(np.float32), rng.normal(0, 18, SHAPE).astype(np.float32))
    return np.clip(vol + noise, 0, 4095).astype(np.uint16)


def touch(img) -> int:
    """What the main process does with an image it received: read one voxel of every 4 KiB page."""
    a = np.asarray(img).reshape(-1)
    return int(a[:: max(1, PAGE // a.itemsize)].sum())


# ----------------------------------------------------------------------------------------------------------
# writers (each returns the paths it wrote, for the disk size)


def write_kneeprep(root: Path, vols: dict[str, np.ndarray], codec: str, level: int = 3) -> Path:
    from kneeprep.formats.quintuples import Quintuple
    from kneeprep.formats.shard_writer import write_shards
    from kneeprep.geometry import Geometry
    from kneeprep.recipe import Recipe, Shards, Splits

    recipe = Recipe(splits=Splits(source="generated"), shards=Shards(codec=codec, level=level))
    geom = Geometry(SHAPE, (0.7, 0.3646, 0.3646), np.diag([0.7, 0.3646, 0.3646, 1.0]))
    qs = [
        Quintuple(
            sample_id=f"{vid}_{q}",
            volume_id=vid,
            patient_id=vid.split("_")[0],
            split="train",
            question_id=str(q),
            question_type="bml",
            question_region="femur medial central",
            question=f"question {q}",
            box=None,
            box_empty=True,
            box_reason="bench",
            reasoning=("step one", "step two"),
            severity=(),
            answer_json="{}",
        )
        for vid in vols
        for q in range(1, QUESTIONS + 1)
    ]
    out = root / f"shards-{codec}"
    write_shards(qs, lambda v: (vols[v], geom), out, recipe)
    return out


def write_hf(root: Path, vols) -> tuple[Path, Path]:
    import datasets

    feats = datasets.Features(
        {"volume_id": datasets.Value("string"), "image": datasets.Array3D(SHAPE, "uint16")}
    )

    def gen():
        for vid, v in vols.items():
            yield {"volume_id": vid, "image": v}

    ds = datasets.Dataset.from_generator(gen, features=feats, cache_dir=str(root / "hf-cache"))
    out = root / "hf"
    ds.save_to_disk(str(out))
    pq = root / "hf-parquet"
    pq.mkdir()
    ds.to_parquet(str(pq / "data.parquet"))
    shutil.rmtree(root / "hf-cache", ignore_errors=True)
    return out, pq


def write_wds(root: Path, vols) -> Path:
    import io

    import webdataset as wds

    out = root / "wds"
    out.mkdir()
    with wds.TarWriter(str(out / "shard-000000.tar")) as w:
        for vid, v in vols.items():
            buf = io.BytesIO()
            np.save(buf, v)
            w.write({"__key__": vid, "npy": buf.getvalue()})
    return out


def write_npy(root: Path, vols) -> Path:
    out = root / "npy"
    out.mkdir()
    for vid, v in vols.items():
        np.save(out / f"{vid}.npy", v)
    return out


# ----------------------------------------------------------------------------------------------------------
# readers


def _per_sample_dataset(kind: str, path: Path, vids: list[str]):
    import torch

    class PerSample(torch.utils.data.Dataset):
        """Map-style: sample i is a quintuple of volume i % N_VOLUMES, which it reads itself."""

        def __len__(self):
            return PER_SAMPLE_N

        def __getitem__(self, i):
            vid = vids[i % len(vids)]
            if kind == "hf":
                if not hasattr(self, "ds"):
                    import datasets

                    self.ds = datasets.load_from_disk(str(path)).with_format("numpy")
                return {"sample_id": f"{vid}_{i}", "image": self.ds[i % len(vids)]["image"]}
            return {"sample_id": f"{vid}_{i}", "image": np.load(path / f"{vid}.npy")}

    return PerSample()


def _wds_dataset(path: Path):
    import io

    import torch
    import webdataset as wds

    class Wds(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            tar = str(path / "shard-000000.tar")
            for j, sample in enumerate(
                wds.WebDataset(tar, shardshuffle=False, workersplitter=None, nodesplitter=None)
            ):
                if info is not None and j % info.num_workers != info.id:
                    continue
                img = np.load(io.BytesIO(sample["npy"]))
                for q in range(QUESTIONS):
                    yield {"sample_id": f"{sample['__key__']}_{q}", "image": img}

    return Wds()


def _loader(kind: str, path: Path, vids: list[str], workers: int, volume_major: bool = False):
    import multiprocessing

    import torch

    ctx = multiprocessing.get_context("fork") if workers else None
    common = dict(num_workers=workers, pin_memory=True, multiprocessing_context=ctx)
    if workers:
        common["persistent_workers"] = True
    if kind == "kneeprep":
        from kneeprep.loader import ShardDataset
        from kneeprep.loader.torchdata import make_loader

        # a window of one volume's samples: with 8 volumes the default 256-sample window spans most of the
        # split; at real scale (thousands of volumes) it is a sliver of each worker's block, as one volume here
        ds = ShardDataset(path, split="train", seed=0, buffer_size=QUESTIONS, volume_major=volume_major)
        return make_loader(ds, batch_size=BATCH, **common)
    ds = _wds_dataset(path) if kind == "wds" else _per_sample_dataset(kind, path, vids)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, **common)


def _consume(kind: str, batch, seen: dict) -> tuple[int, int]:
    """(samples, images touched) for one batch received in the main process.

    The main process touches an image only when it is not among the last ``RECENT`` distinct images it
    touched -- what a training loop with a device cache of recent volumes does (``DeviceFeeder``), and the
    rule the bare rate uses. kneeprep batches name their volumes (``volume_keys``: the same decoded volume in
    consecutive batches has the same key); the other readers hand over a new array per sample."""
    if kind == "kneeprep":
        pairs = list(zip(batch["volume_keys"], batch["volumes"], strict=True))
        n = len(batch)
        if batch["volume_major"]:
            n = sum(len(q) for q in batch["quintuples"])
    else:
        pairs = [(id(im), im) for im in batch["image"]]
        n = len(pairs)
    touched = 0
    for key, img in pairs:
        if key not in seen:
            touch(img)
            touched += 1
            seen[key] = img  # kept alive: ids stay unique
            if len(seen) > RECENT:
                seen.pop(next(iter(seen)))
    return n, touched


def measure(kind: str, path: Path, vids: list[str], workers: int, volume_major: bool = False):
    """(seconds of the timed passes, samples, images the main process received)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        dl = _loader(kind, path, vids, workers, volume_major)
        seen: dict = {}
        for b in dl:  # warm-up: worker start, imports, page cache, slab pool
            _consume(kind, b, seen)
        del b
        seen.clear()
        t = time.perf_counter()
        n = imgs = 0
        while True:  # whole passes until MIN_TIMED_S: per-epoch start-up amortized as in a long epoch
            for b in dl:
                a, c = _consume(kind, b, seen)
                n, imgs = n + a, imgs + c
            del b
            dt = time.perf_counter() - t
            if dt >= MIN_TIMED_S:
                break
        seen.clear()
    del dl
    return dt, n, imgs


def measure_bare(path: Path) -> tuple[float, int]:
    from kneeprep.loader import ShardDataset

    ds = ShardDataset(path, split="train", seed=0, buffer_size=QUESTIONS)
    for warm in (True, False):
        t = time.perf_counter()
        n = 0
        while True:
            seen: dict[int, object] = {}
            for s in ds:
                img = s["image"]
                if id(img) not in seen:
                    seen[id(img)] = img  # keep it alive so ids stay unique
                    touch(img)
                n += 1
                if len(seen) > RECENT:
                    seen.pop(next(iter(seen)))
            dt = time.perf_counter() - t
            if warm or dt >= MIN_TIMED_S:
                break
    return dt, n


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run(workdir: Path) -> str:
    workdir = Path(workdir)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    vids = [f"{9000000 + i}_00M_20040101_{10000000 + i}_1" for i in range(N_VOLUMES)]
    vols = {vid: make_volume(i) for i, vid in enumerate(vids)}
    raw = sum(v.nbytes for v in vols.values())
    print(f"generated {N_VOLUMES} volumes {SHAPE} uint16 ({raw / 2**20:.0f} MiB)", flush=True)
    paths: dict[str, Path] = {}
    sizes: dict[str, int] = {}
    for layout, (codec, level, _) in LAYOUTS.items():
        paths[layout] = write_kneeprep(workdir, vols, codec, level)
    paths["hf"], hf_parquet = write_hf(workdir, vols)
    paths["wds"] = write_wds(workdir, vols)
    paths["npy"] = write_npy(workdir, vols)
    for k, p in paths.items():
        sizes[k] = du(p)
    sizes["hf parquet"] = du(hf_parquet)
    vols.clear()
    print("wrote every layout", flush=True)

    rows: list[
        tuple[str, str, dict[int, float], float | None]
    ] = []  # (name, layout key, sps by workers, bare)
    rates: dict[tuple[str, int], float] = {}
    for layout, (_, _, label) in LAYOUTS.items():
        bdt, bn = measure_bare(paths[layout])
        bare_before = bn / bdt
        for vm in (False, True):
            key = f"{layout}{' vm' if vm else ''}"
            sps = {}
            for w in WORKERS:
                dt, n, imgs = measure("kneeprep", paths[layout], vids, w, vm)
                sps[w] = rates[(key, w)] = n / dt
                print(
                    f"kneeprep {key:16s} {w}w: {n / dt:8.1f} samples/s ({imgs} volumes received)", flush=True
                )
            rows.append((f"kneeprep {label}, {'volume' if vm else 'sample'}-major", key, sps, None))
        # the single-process ceiling moves most on this shared machine (5,700-11,000 samples/s seen for the
        # uncompressed layout): measured before and after the loaders, the higher one is the ceiling
        bdt, bn = measure_bare(paths[layout])
        bare = max(bare_before, bn / bdt)
        rates[(f"{layout} bare", 0)] = bare
        rows[-2:] = [(name, key, sps, bare) for name, key, sps, _ in rows[-2:]]
        print(f"kneeprep {layout} bare in-process: {bare_before:.1f} / {bn / bdt:.1f} samples/s", flush=True)
    for kind, label in (
        ("hf", "HF datasets Array3D, map-style"),
        ("wds", "WebDataset tar of .npy"),
        ("npy", "np.load .npy per sample, map-style"),
    ):
        sps = {}
        for w in WORKERS:
            dt, n, _ = measure(kind, paths[kind], vids, w)
            sps[w] = rates[(kind, w)] = n / dt
            print(f"{kind:25s} {w}w: {n / dt:8.1f} samples/s", flush=True)
        rows.append((label, kind, sps, None))

    hf2 = rates[("hf", 2)]
    lines = [
        "<!-- bench:loader -->",
        "## Loading full-size volumes into the training loop (`bench/bench_loader.py`)",
        "",
        f"{N_VOLUMES} volumes of 160x384x384 uint16 ({raw / 2**20:.0f} MiB raw), {QUESTIONS} quintuples each. "
        f"Samples/s **received in the main process** from a torch DataLoader (batch {BATCH}, `pin_memory=True`, "
        "persistent fork workers; after a warm-up pass, whole passes timed until 3 s), the main process reading one voxel per 4 KiB page of every "
        f"image it receives unless it is among the last {RECENT} distinct images it read -- a device cache of recent volumes, "
        "as `DeviceFeeder` keeps (kneeprep batches name their volumes, so a volume in consecutive batches is read once; "
        "the other readers hand over a new array per sample: every sample's image is read). "
        "Not included: the host-to-device copy (no GPU on this machine: pinning is a no-op) and any model work. "
        f"HF and np.load timed on {PER_SAMPLE_N} samples. Bare = `ShardDataset` in one process, no DataLoader, "
        f"touching each distinct volume once by the same rule; measured before and after that layout's loaders, the higher taken. "
        "Files come from the page cache. The machine is shared: expect noise of tens of percent.",
        "",
        "| reader | disk MiB | samples/s 0w | samples/s 1w | samples/s 2w | 2w vs HF 2w | 2w vs bare |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, key, sps, bare in rows:
        layout = key.split()[0]
        vs_bare = f"{sps[2] / bare:.2f}x" if bare else ""
        lines.append(
            f"| {name} | {sizes[layout] / 2**20:.0f} | {sps[0]:.1f} | {sps[1]:.1f} | {sps[2]:.1f} "
            f"| {sps[2] / hf2:.1f}x | {vs_bare} |"
        )
    for layout, (_, _, label) in LAYOUTS.items():
        lines.append(f"| bare in-process: kneeprep {label} | | {rates[(layout + ' bare', 0)]:.1f} | | | | |")
    lines.append(
        f"| (HF dataset exported to Parquet, size only) | {sizes['hf parquet'] / 2**20:.0f} | | | | | |"
    )

    def goal(name, value, need):
        return f"| {name} | {value:.2f}x | {'yes' if value >= need else 'NO'} |"

    best = max(("none", "none vm"), key=lambda k: rates[(k, 2)])
    lines += [
        "",
        "Goals (issue 14), 2 workers:",
        "",
        "| goal | measured | met |",
        "|---|---:|---|",
        goal(
            "kneeprep end to end >= 20x HF datasets (uncompressed, sample-major)",
            rates[("none", 2)] / hf2,
            20,
        ),
        goal(
            "kneeprep end to end >= 20x HF datasets (uncompressed, volume-major)",
            rates[("none vm", 2)] / hf2,
            20,
        ),
        goal(
            f"compact ({COMPACT}) end to end >= 20x HF datasets (sample-major)", rates[(COMPACT, 2)] / hf2, 20
        ),
        goal(
            "uncompressed sample-major >= 0.5x its bare in-process rate",
            rates[("none", 2)] / rates[("none bare", 0)],
            0.5,
        ),
        goal(
            "uncompressed volume-major >= 0.5x its bare in-process rate",
            rates[("none vm", 2)] / rates[("none bare", 0)],
            0.5,
        ),
        goal(
            f"compact ({COMPACT}) sample-major >= 0.5x its bare rate",
            rates[(COMPACT, 2)] / rates[(COMPACT + " bare", 0)],
            0.5,
        ),
        goal(f"compact ({COMPACT}) bare >= 2x HF datasets (2w)", rates[(COMPACT + " bare", 0)] / hf2, 2),
    ]
    load_after = os.getloadavg()
    lines.append("")
    lines.append(
        f"Best uncompressed mode with 2 workers: {best}. Load average (1, 5, 15 min) at the start "
        f"{', '.join(f'{x:.2f}' for x in load_before)}; at the end {', '.join(f'{x:.2f}' for x in load_after)} "
        f"({os.cpu_count()} cores). Total bench time {time.perf_counter() - t0:.0f} s."
    )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    import sys
    import tempfile

    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    d.mkdir(parents=True, exist_ok=True)
    run(d)
