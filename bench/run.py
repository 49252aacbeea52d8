"""Run every benchmark and write ``bench/RESULTS.md``.

Each ``bench/bench_<name>.py`` module exposes ``run(workdir: pathlib.Path) -> str``: it builds its own inputs
under ``workdir``, runs kneeprep and the competitor side by side in the same process run, prints its table as it
goes, and returns a Markdown section (a table with the measured numbers and ratios, plus a few lines on what was
measured). Benchmarks are never tests: no goal here fails a build; the ratios are recorded for people to read.

    python -m bench.run [--only convert,enhanced,boxes] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

BENCHES = ("convert", "enhanced", "boxes", "loader", "scale", "s3")


def machine() -> str:
    import numpy

    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = "RAM unknown"
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {mem}, Python {platform.python_version()}, "
        f"numpy {numpy.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    ap.add_argument("--out", default="bench/RESULTS.md")
    ap.add_argument("--workdir", default="bench/_work")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    work = Path(args.workdir)
    sections = []
    for name in names:
        mod = importlib.import_module(f"bench.bench_{name}")
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        sections.append(mod.run(d))
        print(f"== {name} done in {time.perf_counter() - t:.0f} s", flush=True)
    out = Path(args.out)
    previous = _previous_sections(out) if args.only else {}
    for name, text in zip(names, sections, strict=True):
        previous[name] = text
    body = "\n\n".join(previous[n] for n in BENCHES if n in previous)
    stamp = datetime.date.today().isoformat()
    out.write_text(
        f"# Benchmark results\n\nLatest `make bench` output ({stamp}; {machine()}).\n"
        f"Regenerate with `make bench` (or `python -m bench.run --only NAME`).\n\n{body}\n"
    )
    print(f"wrote {out}")
    return 0


def _previous_sections(path: Path) -> dict[str, str]:
    """Keep the sections of benchmarks not re-run (`--only`), keyed by their `<!-- bench:NAME -->` marker."""
    if not path.exists():
        return {}
    out, name, buf = {}, None, []
    for line in path.read_text().splitlines():
        if line.startswith("<!-- bench:"):
            if name:
                out[name] = "\n".join(buf).strip()
            name, buf = line[len("<!-- bench:") : -len(" -->")], [line]
        elif name:
            buf.append(line)
    if name:
        out[name] = "\n".join(buf).strip()
    return out


if __name__ == "__main__":
    sys.exit(main())
