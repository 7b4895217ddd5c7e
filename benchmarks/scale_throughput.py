"""Scale benchmark: the whole score-corpus job on synthetic corpora of 10^5 and 10^6 small images.

    python benchmarks/scale_throughput.py --out scale.json                 # everything (~25 min, 2 cores)
    python benchmarks/scale_throughput.py --rows 100000 --kinds parquet --glow-rows 0 --out quick.json

Each job runs in a fresh driver process (an embedded Ray, like `python jobs/score_corpus.py`), so its
peak RSS (``ru_maxrss``) is the driver's alone; one JSON record per job with ``rows``, ``source_kind``,
``workers``, ``rows_per_s`` (wall-clock extraction), ``steady_rows_per_s`` (wall-clock from the first
shard's start to the last shard's end on the workers: without Ray's start-up and model loading, with
every wait in between), ``rows_per_worker_s`` (per busy worker-second),
``driver_peak_rss_bytes`` and the seconds of every stage. Three targets:

- ``driver_rss``: the driver's peak RSS at 10^6 rows at most 1.5x that at 10^5 (no per-row state);
- ``pipeline_vs_engine``: on the Glow default, steady-state wall-clock rows/s per worker at least 0.85x
  the in-process engine (same batch, one thread), timed before and after the jobs;
- ``two_workers``: 2 workers at least 1.7x one (steady-state wall-clock), on the Glow default, where
  the model and not decoding is the work; next to it, two engine processes at once without Ray against
  one (the machine's own ceiling for two workers).

The large corpora use a cheap model (a one-step Glow on 8x8 images) so that what is measured is the
pipeline: listing, planning, decoding, Ray Data, scoring, the distributed sort and the writes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHEAP_GLOW = {"in_channels": 1, "image_size": 8, "num_levels": 1, "num_steps": 1, "hidden_channels": 4}
GLOW_DEFAULT = REPO / "gradood" / "pretrained" / "glow_fmnist_small"


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cheap_checkpoint(directory: Path) -> Path:
    from gradood.models.checkpoint import save_checkpoint
    from gradood.models.glow import Glow
    from gradood.seeding import draw_noise

    if (directory / "model.json").exists():
        return directory
    torch.manual_seed(0)
    model = Glow(**CHEAP_GLOW)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8)).astype(np.float32))
    model.init_from_data(x, draw_noise(model.noise_spec(), [f"init{i}" for i in range(64)], 0))
    save_checkpoint(model, directory, {"note": "benchmark model, not trained"})
    return directory


def png_bytes(rng: np.random.Generator, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def parquet_corpus(directory: Path, rows: int, rows_per_file: int = 100_000) -> Path:
    done = directory.parent / f"{directory.name}._DONE"  # outside: the corpus holds Parquet files only
    if done.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for f, lo in enumerate(range(0, rows, rows_per_file)):
        rng = np.random.default_rng(f)
        images = [png_bytes(rng, 8) for _ in range(min(rows_per_file, rows - lo))]
        pq.write_table(
            pa.table({"image": pa.array(images, pa.binary())}),
            directory / f"part-{f:04d}.parquet",
            row_group_size=4096,
        )
    done.write_text("")
    return directory


def folder_corpus(directory: Path, rows: int, per_folder: int = 1000) -> Path:
    if (directory.parent / f"{directory.name}._DONE").exists():
        return directory
    for folder, lo in enumerate(range(0, rows, per_folder)):
        rng = np.random.default_rng(folder)
        sub = directory / f"d{folder:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_folder, rows - lo)):
            (sub / f"{i:04d}.png").write_bytes(png_bytes(rng, 8))
    (directory.parent / f"{directory.name}._DONE").write_text("")
    return directory


def fashion_mnist_folder(directory: Path, rows: int) -> Path:
    from gradood.data.fashion_mnist import load_fashion_mnist

    if (directory.parent / f"{directory.name}._DONE").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    train, _ = load_fashion_mnist("train")
    for i in range(rows):
        Image.fromarray(train[i % len(train)]).save(directory / f"{i:06d}.png")
    (directory.parent / f"{directory.name}._DONE").write_text("")
    return directory


def run_job(overrides: list[str]) -> dict[str, Any]:
    """One score-corpus job in a fresh driver process; its summary plus the driver's peak RSS.

    The job's output folder is emptied first: a run would otherwise take over the shards of the last
    one (same plan, same run id) instead of computing them.
    """
    output = next(o.split("=", 1)[1] for o in overrides if o.startswith("output.uri="))
    shutil.rmtree(output, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, __file__, "--job", json.dumps(overrides)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"job failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def job_main(overrides: list[str]) -> None:
    from gradood.config import ScoreCorpusConfig, load_config
    from gradood.pipeline.ray_job import run_score_corpus

    cfg = load_config(ScoreCorpusConfig, [REPO / "conf" / "score_corpus.yaml"], overrides)
    summary = run_score_corpus(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    keep = ("inputs", "scored", "rejected", "feature_rows", "flagged", "seconds", "throughput")
    print("RESULT " + json.dumps({**{k: summary[k] for k in keep}, "driver_peak_rss_bytes": peak}))


def record(result: dict[str, Any], rows: int, kind: str, workers: int, model: str) -> dict[str, Any]:
    throughput = result["throughput"]
    rec = {
        "rows": rows,
        "source_kind": kind,
        "workers": workers,
        "model": model,
        "rows_per_s": throughput["rows_per_s"],
        "steady_rows_per_s": throughput["steady_rows_per_s"],
        "rows_per_worker_s": throughput["rows_per_worker_s"],
        "driver_peak_rss_bytes": result["driver_peak_rss_bytes"],
        "seconds": result["seconds"],
        "scored": result["scored"],
        "rejected": result["rejected"],
    }
    log(
        f"{model} {kind} {rows} rows, {workers} workers: {rec['rows_per_s']:.0f} rows/s wall, "
        f"{rec['steady_rows_per_s'] or float('nan'):.0f} steady, driver peak RSS "
        f"{rec['driver_peak_rss_bytes'] / 2**20:.0f} MiB, seconds {json.dumps(result['seconds'])}"
    )
    return rec


def in_process_engine(batch_size: int, repeats: int) -> list[float]:
    """Seconds per engine call on the Glow default, one thread, a batch of real rows (like a worker)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from feature_throughput import runner, time_round_robin

    from gradood.data.fashion_mnist import load_fashion_mnist
    from gradood.models.checkpoint import load_checkpoint
    from gradood.seeding import draw_noise

    torch.set_num_threads(1)
    model, _ = load_checkpoint(GLOW_DEFAULT)
    train, _ = load_fashion_mnist("train")
    x = torch.from_numpy(train[:batch_size, None].astype(np.float32))
    noise = draw_noise(model.noise_spec(), [f"b{i}" for i in range(batch_size)], 0)
    return time_round_robin({"engine": runner("engine", model, x, noise, 1)}, repeats, torch.device("cpu"))[
        "engine"
    ]


def concurrent_engines(processes: int, repeats: int) -> float:
    """Rows/s of ``processes`` in-process engines at once, each in its own process: the machine's own
    ceiling for that many workers, without Ray."""
    runs = [
        subprocess.Popen(
            [sys.executable, __file__, "--engine", str(repeats)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    return sum(float(run.communicate()[0].split()[-1]) for run in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", help="JSON file of the records and checks")
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="*", default=["parquet", "folder"], choices=["parquet", "folder"])
    parser.add_argument("--workers", type=int, default=2, help="workers of the large-corpus jobs")
    parser.add_argument("--glow-rows", type=int, default=16384, help="rows of the Glow jobs (0: skip)")
    parser.add_argument("--glow-shard-size", type=int, default=512, help="shard size of the Glow jobs")
    parser.add_argument("--shard-size", type=int, default=4096, help="shard size of the large-corpus jobs")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--work-dir", default="/tmp/gradood-scale", help="corpora are cached here")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--engine", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        return job_main(json.loads(args.job))
    if args.engine:
        return print(64 / statistics.median(in_process_engine(64, args.engine)))
    if not args.out:
        parser.error("--out is required")

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cheap = cheap_checkpoint(work / "cheap_glow")
    records: list[dict[str, Any]] = []
    for kind in args.kinds:
        for rows in args.rows:
            log(f"corpus: {kind}, {rows} rows")
            make = parquet_corpus if kind == "parquet" else folder_corpus
            corpus = make(work / f"{kind}-{rows}", rows)
            result = run_job(
                [
                    "model=glow",
                    f"model.checkpoint={cheap}",
                    f"corpus.uri={corpus}",
                    f"output.uri={work / 'out' / f'{kind}-{rows}'}",
                    f"output.detector_uri={work / 'out' / 'cheap_detector.json'}",
                    "fit.size=2000",
                    f"extract.num_workers={args.workers}",
                    f"extract.shard_size={args.shard_size}",
                    "extract.batch_size=512",
                    "run.report_top_k=8",
                ]
            )
            records.append(record(result, rows, kind, args.workers, "cheap_glow_8x8"))

    checks: dict[str, Any] = {}
    by_kind = {(r["source_kind"], r["rows"]): r for r in records}
    for kind in args.kinds:
        small, large = by_kind.get((kind, 100_000)), by_kind.get((kind, 1_000_000))
        if small and large:
            ratio = large["driver_peak_rss_bytes"] / small["driver_peak_rss_bytes"]
            checks[f"driver_rss_{kind}"] = {"ratio_1e6_vs_1e5": ratio, "target": 1.5, "met": ratio <= 1.5}

    if args.glow_rows:
        corpus = fashion_mnist_folder(work / f"fmnist-{args.glow_rows}", args.glow_rows)
        times = in_process_engine(64, args.repeats)
        glow = {}
        for workers in (1, 2):
            result = run_job(
                [
                    "model=glow",
                    f"corpus.uri={corpus}",
                    f"output.uri={work / 'out' / f'glow-{workers}'}",
                    f"output.detector_uri={work / 'out' / 'glow_detector.json'}",
                    f"extract.num_workers={workers}",
                    f"extract.shard_size={args.glow_shard_size}",
                ]
            )
            glow[workers] = record(result, args.glow_rows, "folder", workers, "glow_default")
            records.append(glow[workers])
        times += in_process_engine(64, args.repeats)  # both sides see the shared machine's drift
        engine_rows_per_s = 64 / statistics.median(times)
        per_worker = glow[1]["steady_rows_per_s"]
        checks["pipeline_vs_engine"] = {
            "in_process_rows_per_s": engine_rows_per_s,
            "steady_rows_per_s_per_worker": per_worker,
            "ratio": per_worker / engine_rows_per_s,
            "busy_ratio": glow[1]["rows_per_worker_s"] / engine_rows_per_s,
            "target": 0.85,
            "met": per_worker / engine_rows_per_s >= 0.85,
        }
        speedup = glow[2]["steady_rows_per_s"] / glow[1]["steady_rows_per_s"]
        ceiling = concurrent_engines(2, args.repeats) / concurrent_engines(1, args.repeats)
        checks["two_workers"] = {
            "speedup": speedup,
            "two_engine_processes_without_ray": ceiling,
            "target": 1.7,
            "met": speedup >= 1.7,
        }

    Path(args.out).write_text(json.dumps({"records": records, "checks": checks}, indent=2) + "\n")
    for name, check in checks.items():
        log(f"{name}: {json.dumps(check)}")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
