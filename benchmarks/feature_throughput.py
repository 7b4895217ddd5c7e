"""Feature-extraction cost of every method against ONE plain batched forward + backward (the floor).

    python benchmarks/feature_throughput.py --out results.json            # every model family, CPU
    python benchmarks/feature_throughput.py --quick --out quick.json      # smaller batch, fewer repeats
    python benchmarks/feature_throughput.py --device cuda --out gpu.json  # on a GPU

For every registered model family, at its default config and at a larger "paper-size" one, it times
(after warm-up, methods interleaved round-robin so a noisy shared machine hits them alike, median of
``--repeats``): plain fwd+bwd, the engine, whole-model vmap and the per-sample loop, all through
``extract_features`` as the pipeline calls it, and Opacus / BackPACK when installed (``external.py``;
a model they cannot handle gets a record with the reason instead of a time). Peak memory is taken in a
separate run (CUDA: the allocator's peak; CPU: torch allocations replayed from the profiler's memory
events, relative to the start of the call). ``max_rel_err`` compares each method's features with a
float64 per-sample loop on the first ``--check-rows`` rows. Models are randomly initialised (ActNorm
from data) with every parameter perturbed, so no feature is identically zero.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import external
import numpy as np
import torch

from gradood.config import ExtractConfig
from gradood.features import extract_features, group_ids
from gradood.models import DensityModel, build_model, model_names
from gradood.seeding import draw_noise

#: the paper's architectures; CPU runs scale the depth down (same widths, hence the same per-layer costs)
PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    "glow": dict(in_channels=3, image_size=32, num_levels=3, num_steps=32, hidden_channels=512),
    # conf/model/vae.yaml's paper-size setting (32x32 colour, 64 hidden channels, latent 32)
    "vae": dict(in_channels=3, image_size=32, hidden_channels=64, latent_dim=32),
    # the reference code's FashionMNIST PixelCNN: 8 causal 7x7 convs of 64 channels
    "pixelcnn": dict(channels=64, num_layers=7, kernel_size=7, first_kernel_size=7, head_channels=64),
    # conf/model/ddpm.yaml's paper-size setting (the reference's lucidrains U-Net on 32x32 colour)
    "ddpm": dict(
        in_channels=3,
        image_size=32,
        dim=32,
        dim_mults=[1, 2, 4, 8],
        num_res_blocks=2,
        attn_dim_head=32,
        linear_attn_levels=[0, 1, 2, 3],
    ),
}
CPU_PAPER_OVERRIDES: dict[str, dict[str, Any]] = {
    "glow": dict(num_steps=4),
    "pixelcnn": dict(num_layers=2),
    "ddpm": dict(num_res_blocks=1),
}

METHODS = ("plain", "engine", "vmap", "loop")


def make_model(name: str, params: dict[str, Any], device: torch.device, seed: int = 0) -> DensityModel:
    torch.manual_seed(seed)
    model = build_model(name, params).to(device)
    x, noise = make_batch(model, 64, device, seed=seed + 1)
    model.init_from_data(x, noise)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.prepare_for_scoring()
    return model


def make_batch(
    model: DensityModel, n: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *model.input_shape), generator=gen).float()
    noise = draw_noise(model.noise_spec(), [f"bench{i}" for i in range(n)], seed)
    return x.to(device), {k: v.to(device) for k, v in noise.items()}


def runner(
    method: str, model: DensityModel, x: torch.Tensor, noise: dict, group_size: int
) -> Callable[[], Any]:
    if method in external.LIBRARIES:
        if group_size != 1:
            raise external.Unsupported("set-level features (group_size > 1) are gradood's own")
        sqnorms = external.prepare(method, model)
        return lambda: sqnorms(x, noise)
    if method == "plain":
        params = [p for p in model.parameters() if p.requires_grad]

        def plain() -> None:
            with torch.enable_grad():
                torch.autograd.grad(model.log_prob(x, noise).sum(), params)

        return plain
    groups = group_ids(len(x), group_size)
    return lambda: extract_features(model, x, noise, groups, method=method)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 2
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an op's own allocations (net of its own frees) are recorded on the op, frees of earlier
    # tensors as "[memory]" events; replaying both in time order gives the live-bytes curve
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def rel_errors(
    model: DensityModel, methods: list[str], x: torch.Tensor, noise: dict, group_size: int
) -> dict:
    """Per method: max relative error of its features against a float64 per-sample loop, with the
    model in float32 (``max_rel_err``: what a job gets) and in float64 (``max_rel_err_f64``: the
    method's own exactness, free of the float32 model's round-off)."""
    groups = group_ids(len(x), group_size)
    m64 = copy.deepcopy(model).double()
    x64, noise64 = x.double(), {k: v.double() for k, v in noise.items()}

    def features(method: str, model: DensityModel, x: torch.Tensor, noise: dict) -> np.ndarray:
        if method in external.LIBRARIES:
            return external.prepare(method, model)(x, noise).numpy()
        return extract_features(model, x, noise, groups, method=method).sqnorms

    ref = features("loop", m64, x64, noise64)

    def err(sqnorms: np.ndarray) -> float:
        return float(np.max(np.abs(sqnorms - ref) / np.maximum(ref, 1e-300)))

    return {
        m: dict(
            max_rel_err=err(features(m, model, x, noise)),
            max_rel_err_f64=err(features(m, m64, x64, noise64)),
        )
        for m in methods
        if m != "plain"
    }


def bench_config(
    family: str, config: str, params: dict, args: argparse.Namespace, device_name: str
) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    model = make_model(family, params, device)
    x, noise = make_batch(model, args.batch_size, device)
    fns: dict[str, Callable[[], Any]] = {}
    unsupported: dict[str, str] = {}
    for m in args.methods:
        try:
            fns[m] = runner(m, model, x, noise, args.group_size)
            if m in external.LIBRARIES:
                fns[m]()  # a library that skips parameters says so on its first call
        except external.Unsupported as e:
            unsupported[m] = str(e)
            fns.pop(m, None)
    methods = list(fns)
    times = time_round_robin(fns, args.repeats, device)
    peaks = {m: peak_memory(fns[m], device) for m in methods}
    rows = args.check_rows
    errors = rel_errors(model, methods, x[:rows], {k: v[:rows] for k, v in noise.items()}, args.group_size)
    plain_t = statistics.median(times["plain"])
    records = []
    for m in methods:
        t = statistics.median(times[m])
        records.append(
            dict(
                model=family,
                config=config,
                params=params,
                device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                torch_threads=torch.get_num_threads(),
                batch_size=args.batch_size,
                group_size=args.group_size,
                num_features=sum(1 for p in model.parameters() if p.requires_grad),
                method=m,
                time_s=t,
                times_s=times[m],
                ratio_vs_plain=t / plain_t,
                rows_per_s=args.batch_size / t,
                peak_mem_bytes=peaks[m],
                peak_mem_ratio_vs_plain=peaks[m] / peaks["plain"],
                **errors.get(m, dict(max_rel_err=None, max_rel_err_f64=None)),
            )
        )
    records += [
        dict(model=family, config=config, params=params, method=m, batch_size=args.batch_size, error=reason)
        for m, reason in unsupported.items()
    ]
    by_method = {r["method"]: r for r in records if "error" not in r}
    if "engine" in by_method:
        for other in ("loop", "vmap", *external.LIBRARIES):
            if other in by_method:
                by_method["engine"][f"speedup_vs_{other}"] = (
                    by_method[other]["time_s"] / by_method["engine"]["time_s"]
                )
    return records


def bench_pipeline(args: argparse.Namespace) -> list[dict]:
    """Throughput of a local Ray extraction job (one worker, engine) against the in-process engine.

    Per-worker throughput is rows scored / seconds the worker spent in its shards (decode, noise,
    features, Parquet write: everything but Ray's own start-up), so it compares like with like.
    """
    import tempfile
    from pathlib import Path

    from PIL import Image

    from gradood.config import ScoreCorpusConfig, load_config
    from gradood.core.ray_runtime import init_ray
    from gradood.data.sources import open_source
    from gradood.models.checkpoint import WEIGHTS_FILE, read_checkpoint_meta, save_checkpoint
    from gradood.pipeline.extract import run_extraction

    family, device = "glow", torch.device("cpu")
    torch.set_num_threads(1)  # what each pipeline worker runs with (extract.torch_threads=1)
    model = make_model(family, {}, device)
    x, noise = make_batch(model, args.batch_size, device)
    engine = runner("engine", model, x, noise, args.group_size)
    times = time_round_robin({"engine": engine}, args.repeats, device)["engine"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, corpus = Path(tmp) / "model", Path(tmp) / "corpus"
        save_checkpoint(model, ckpt)
        corpus.mkdir()
        rng = np.random.default_rng(0)
        c, h, w = model.input_shape
        for i in range(args.pipeline_rows):
            pixels = rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)
            Image.fromarray(pixels).save(corpus / f"img{i:06d}.png")
        cfg = load_config(
            ScoreCorpusConfig,
            overrides=[
                f"seed={0}",
                "extract.method=engine",
                f"extract.batch_size={args.batch_size}",
                f"extract.group_size={args.group_size}",
                f"extract.shard_size={args.pipeline_shard_size}",
                "extract.num_workers=1",
                "extract.cpus_per_worker=1",
                "extract.torch_threads=1",
            ],
        )
        init_ray(num_cpus=2, min_cpus=1)
        totals = run_extraction(
            "benchmark",
            open_source(str(corpus)),
            str(Path(tmp) / "out"),
            (ckpt / WEIGHTS_FILE).read_bytes(),
            read_checkpoint_meta(ckpt),
            cfg,
        )
    # timed again after the job too, so drift of a shared machine's load hits both sides alike
    times += time_round_robin({"engine": engine}, args.repeats, device, warmup=0)["engine"]
    in_process = args.batch_size / statistics.median(times)
    per_worker = totals.rows_scored / totals.worker_seconds
    record = dict(
        model=family,
        config="default",
        device="cpu",
        torch_threads=1,
        batch_size=args.batch_size,
        group_size=args.group_size,
        method="engine",
        mode="pipeline",
        rows=totals.rows_scored,
        shards=totals.shards,
        in_process_rows_per_s=in_process,
        pipeline_rows_per_s_per_worker=per_worker,
        pipeline_rows_per_s_wall=totals.rows_in / totals.seconds,
        pipeline_vs_in_process=per_worker / in_process,
    )
    print(
        f"in-process engine {in_process:.0f} rows/s; pipeline worker {per_worker:.0f} rows/s "
        f"({record['pipeline_vs_in_process']:.2f}x), wall {record['pipeline_rows_per_s_wall']:.0f} rows/s"
    )
    return [record]


def print_table(records: list[dict]) -> None:
    head = (
        f"{'model':8} {'config':8} {'method':7} {'batch':>5} {'time ms':>9} {'x plain':>8} {'mem x':>6} "
        f"{'max rel err':>11} {'(model f64)':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in records:
        if "error" in r:
            print(f"{r['model']:8} {r['config']:8} {r['method']:7} unsupported: {r['error'][:200]}")
            continue
        err, err64 = ("-" if r[k] is None else f"{r[k]:.1e}" for k in ("max_rel_err", "max_rel_err_f64"))
        print(
            f"{r['model']:8} {r['config']:8} {r['method']:7} {r['batch_size']:5d} {1e3 * r['time_s']:9.1f} "
            f"{r['ratio_vs_plain']:8.2f} {r['peak_mem_ratio_vs_plain']:6.2f} {err:>11} {err64:>11}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="results.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="*", default=None, help="model families (default: all registered)")
    parser.add_argument("--configs", nargs="*", default=["default", "paper"])
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[*METHODS, *external.installed()],
        help=f"of {', '.join([*METHODS, *external.LIBRARIES])} (default: all that are installed)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=ExtractConfig.batch_size,
        help="rows per extraction call (default: the job's extract.batch_size)",
    )
    parser.add_argument("--group-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-rows", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 is what each CPU pipeline worker uses (0: torch's default)",
    )
    parser.add_argument("--quick", action="store_true", help="batch 16, 3 repeats (a smoke run)")
    parser.add_argument(
        "--pipeline", action="store_true", help="instead: a local Ray extraction job vs the in-process engine"
    )
    parser.add_argument("--pipeline-rows", type=int, default=4096)
    parser.add_argument("--pipeline-shard-size", type=int, default=512)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.repeats = 16, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    if "plain" not in args.methods:
        args.methods = ["plain", *args.methods]
    if args.pipeline:
        records = bench_pipeline(args)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)
        return
    device = torch.device(args.device)
    records: list[dict] = []
    # one fresh process per (model, config): the allocator state an earlier model's multi-GB vmap run
    # leaves behind would otherwise slow the later models' allocation-heavy methods unevenly
    spawn = multiprocessing.get_context("spawn")
    for family in args.models or model_names():
        for config in args.configs:
            params = {} if config == "default" else dict(PAPER_CONFIGS.get(family, {}))
            if config == "paper" and not params:
                print(f"{family}: no paper-size config, skipped")
                continue
            if config == "paper" and device.type == "cpu":
                params.update(CPU_PAPER_OVERRIDES.get(family, {}))
            print(f"{family} {config} {params} on {device}, batch {args.batch_size} ...", flush=True)
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                records += pool.submit(bench_config, family, config, params, args, args.device).result()
            print_table([r for r in records if r["model"] == family and r["config"] == config])
    with open(args.out, "w") as f:
        json.dump(records, f, indent=2)
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
