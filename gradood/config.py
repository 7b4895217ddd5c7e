"""Typed job configuration: dataclasses merged with YAML files and CLI dotlist overrides by omegaconf.

Unknown keys, wrong types and values a dataclass refuses fail fast with one :class:`ConfigError` line
naming the key; the jobs turn it into exit status 2 (:mod:`gradood.core.cli`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MissingMandatoryValue, OmegaConf, ValidationError
from omegaconf.errors import ConfigKeyError

from gradood.core.checks import check_split
from gradood.core.choices import Combination, FdrMethod, FeatureMethod, Interpolation, ResizePolicy, TestName
from gradood.core.cli import ConfigError, check_dotlist, setting_keys, unknown_key

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    #: registry name (vae, glow, ddpm, pixelcnn, or a registered model of your own)
    name: str = "vae"
    #: constructor keyword arguments of the model family
    params: dict[str, Any] = field(default_factory=dict)
    #: checkpoint directory (model.pt + model.json); trained first when missing and train.if_missing
    checkpoint: str = "gradood/pretrained/vae_fmnist_small"


@dataclass
class ImageConfig:
    #: how inputs of another size reach the model's size: resize (whole image, aspect not kept),
    #: center_crop (crop/pad only), resize_center_crop (shorter side to size, then centre crop)
    resize: ResizePolicy = ResizePolicy.resize
    #: resampling filter for resizing: nearest, bilinear, bicubic, lanczos, box, hamming
    interpolation: Interpolation = Interpolation.bilinear


@dataclass
class TrainConfig:
    #: training data; same URI forms as corpus.uri
    uri: str = "torchvision://FashionMNIST?split=train"
    #: train on the first this many rows of train.uri (null: all)
    size: int | None = None
    #: share of those rows held out of training, by a hash of (seed, row id): the model never sees them,
    #: the held-out loss is measured on them, and the scoring job fits its detector on them when fit.uri
    #: is not set (0: none held out; the rows after train.size, if any, are then the held-out rows)
    holdout_fraction: float = 0.1
    #: held-out rows the held-out loss is measured on after every epoch (0: none)
    eval_rows: int = 2000
    #: stop after this many epochs without a better held-out loss (null: run train.epochs); the
    #: exported checkpoint is the epoch with the best held-out loss either way
    patience: int | None = None
    #: passes over the training rows
    epochs: int = 3
    #: rows per optimiser step on each worker
    batch_size: int = 64
    #: Adam's learning rate after warmup
    lr: float = 1e-3
    #: Adam's L2 penalty
    weight_decay: float = 0.0
    #: gradients are clipped to this total norm
    grad_clip: float = 50.0
    #: optimiser steps of linear learning-rate warmup from lr/warmup_steps to lr
    warmup_steps: int = 200
    #: rows used for ActNorm's data-dependent init
    init_rows: int = 512
    #: Ray Train workers (data-parallel)
    num_workers: int = 1
    #: GPUs each training worker asks Ray for (0: CPU workers)
    gpus_per_worker: float = 0.0
    #: CPUs each training worker asks Ray for
    cpus_per_worker: int = 1
    #: Ray Train run name (null: the model.checkpoint folder's name); rerunning with the same name and
    #: train.runs_uri resumes from the run's latest checkpoint
    name: str | None = None
    #: where Ray Train keeps the run (shared storage such as s3:// on a multi-node cluster)
    runs_uri: str = "runs/ray_train"
    #: worker failures Ray Train recovers from before the run fails
    max_failures: int = 0
    #: train when model.checkpoint does not exist (score_corpus only)
    if_missing: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"train.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.eval_rows < 0:
            raise ValueError(f"train.eval_rows must be at least 0, got {self.eval_rows}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"train.patience must be at least 1 or null, got {self.patience}")


@dataclass
class FitConfig:
    """Held-out in-distribution data the per-layer log-Gaussians are fitted on."""

    #: held-out in-distribution rows (never rows the model was trained on); same URI forms as corpus.uri;
    #: null: the rows the checkpoint held out of its training source (model.json training.data)
    uri: str | None = None
    #: first row used (of fit.uri, or of the checkpoint's held-out rows)
    start: int = 0
    #: rows from fit.start on (null: all); fit, calibration part 1 and part 2 are split from them
    size: int | None = 10_000
    #: squared norms are clipped to this floor before the log (guards log(0) for dead layers)
    min_sqnorm: float = 1e-30
    #: layers whose log-norm std on the fit set is below this are dropped (and counted)
    min_std: float = 1e-12
    #: share of the held-out rows kept out of the fit for calibration (p-values); split by a hash of
    #: (seed, row id) into part 1 (the single tests' p-values) and part 2 (the combined test's)
    calibration_fraction: float = 0.8
    #: share of all held-out rows in calibration part 2: its size n sets the smallest p-value,
    #: 1 / (n + 1), and so the smallest OOD share a night can be flagged at (null: half the held-out share)
    part_2_fraction: float | None = 0.5
    #: refit even when a detector with matching settings exists (it is reused otherwise)
    refit: bool = False

    def __post_init__(self) -> None:
        check_split(self.calibration_fraction, self.part_2_fraction)


#: which test's score and p-value rank and flag the corpus: the combination or one single test
FlagTest = StrEnum("FlagTest", {"combined": "combined", **{t.name: t.value for t in TestName}})


@dataclass
class DetectConfig:
    #: the test behind ood_score, p_value, rank and flags (every test's score and p-value is kept)
    test: FlagTest = FlagTest.combined
    #: the single tests the combined test combines (complexity needs the features' complexity_bits,
    #: which extraction always writes)
    components: list[TestName] = field(
        default_factory=lambda: [TestName.paper, TestName.fullcov, TestName.typicality, TestName.complexity]
    )
    #: fisher: -2 sum_k log p_k; tippett: -min_k log p_k (both calibrated on held-out rows); adaptive:
    #: Fisher over the components' Fisher statistic and a classifier of all tests learned from the night
    combination: Combination = Combination.adaptive
    #: adaptive: at most this many rows of the night and calibration part 2 train the night's
    #: classifier (each row with the same chance, by a hash of (seed, row id))
    adaptive_rows: int = 20000

    def __post_init__(self) -> None:
        if self.adaptive_rows < 1:
            raise ValueError(f"detect.adaptive_rows must be at least 1, got {self.adaptive_rows}")


@dataclass
class FlagConfig:
    #: false-discovery rate the flags are controlled at, over one run's p-values
    fdr: float = 0.05
    #: bh: Benjamini-Hochberg (conformal p-values are PRDS); storey: adaptive BH, q divided by the
    #: estimated in-distribution share; by: Benjamini-Yekutieli (any dependence)
    method: FdrMethod = FdrMethod.bh

    def __post_init__(self) -> None:
        if not 0 < self.fdr < 1:
            raise ValueError(f"flag.fdr must be in (0, 1), got {self.fdr}")


@dataclass
class ExtractConfig:
    #: at most this many rows per forward/backward pass on a CPU worker; groups are never split
    batch_size: int = 64
    #: the same on a GPU worker (gpus_per_worker > 0), where larger passes keep the device busy
    gpu_batch_size: int = 512
    #: B>1: features of the gradient of the summed log-likelihood of B consecutive rows
    group_size: int = 1
    #: how the per-sample norms are computed (all exact): engine (fastest), vmap, loop (the reference)
    method: FeatureMethod = FeatureMethod.engine
    #: rows per shard: the unit of parallelism, of output files and of retries
    shard_size: int = 512
    #: model workers (Ray actors) computing the per-layer gradient norms
    num_workers: int = 2
    #: CPUs each model worker asks Ray for (shrunk to fit a smaller cluster, with a log line)
    cpus_per_worker: float = 1.0
    #: GPUs each model worker asks Ray for (0: CPU workers)
    gpus_per_worker: float = 0.0
    #: torch intra-op threads per worker (0: leave torch's default)
    torch_threads: int = 1
    #: CPUs of each reading-and-decoding task, which run ahead of the model workers (0 < x)
    decode_cpus: float = 1.0


@dataclass
class CorpusConfig:
    #: "demo" (build the demo corpus under OUTPUT/demo_corpus), a folder of images, a Parquet file or
    #: folder, or torchvision://Name?split=..; local paths or pyarrow filesystem URIs (s3://, gs://)
    uri: str = "demo"
    #: Parquet image column (auto-detected when null)
    image_column: str | None = None
    #: score only the first this many inputs (null: all)
    size: int | None = None
    #: uri=demo: rows of each OOD source, and held-out FashionMNIST rows (a night mostly in-distribution)
    demo_rows_per_source: int = 50
    #: uri=demo: held-out FashionMNIST rows of the demo night
    demo_id_rows: int = 2000
    #: pixels (width * height) above which an image is an error row (checked before decoding); null: no limit
    max_pixels: int | None = 50_000_000
    #: encoded bytes per image file or Parquet cell above which it is an error row; null: no limit
    max_bytes: int | None = 67_108_864


@dataclass
class OutputConfig:
    #: where detector.json, the run partitions (runs/<id>/), runs.json and report.html go
    uri: str = "runs/score_corpus"
    #: detector.json location (default OUTPUT/detector.json); an existing one is reused when its
    #: model fingerprint, group size and fit settings match
    detector_uri: str | None = None


@dataclass
class RayConfig:
    #: CPUs of the embedded local Ray (ignored when attaching to a cluster via RAY_ADDRESS)
    num_cpus: int | None = None


@dataclass
class RunConfig:
    """One night's run: its partition, incremental input selection and report."""

    #: the run's partition under output.uri/runs/ (default: today's UTC date, YYYY-MM-DD)
    id: str | None = None
    #: score only inputs that no published run has scored with the same size and modification time
    incremental: bool = False
    #: thumbnails of the most OOD rows in report.html
    report_top_k: int = 24
    #: seconds a stage may go without progress (extraction: a finished shard; scoring: a scored block)
    #: before the run fails, naming the stage (a rerun resumes from the finished shards); null or 0: wait
    #: forever
    stall_timeout_s: float | None = 1800.0
    #: a run holds a lease on its run id (leases/<id>.json, heartbeat every quarter of this); a second
    #: run of the same id refuses while the holder's heartbeat is younger than this many seconds, and
    #: takes the lease over after that
    lease_timeout_s: float = 600.0


@dataclass
class TrainJobConfig:
    #: every random draw derives from the seed and the row id
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class ScoreCorpusConfig(TrainJobConfig):
    """Everything training needs (the model is trained first when missing) plus the scoring job's own."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    flag: FlagConfig = field(default_factory=FlagConfig)
    run: RunConfig = field(default_factory=RunConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)


@dataclass
class EvaluateSettings:
    #: model families of the grid
    families: list[str] = field(default_factory=lambda: ["glow", "ddpm", "vae", "pixelcnn"])
    #: set sizes B of the grid (1: single images)
    group_sizes: list[int] = field(default_factory=lambda: [1, 5])
    #: OOD sources of gradood.data.demo (held-out FashionMNIST is always the in-distribution source)
    sources: list[str] = field(
        default_factory=lambda: [
            "digits",
            "fashion_mnist_inverted",
            "uniform_noise",
            "fashion_mnist_vflip",
            "fashion_mnist_hflip",
            "glyphs",
            "photo_patches",
        ]
    )
    #: rows of each OOD source in the grid's corpus
    rows_per_source: int = 1000
    #: held-out FashionMNIST rows of the corpus (test rows 5000 on; the derived sources read the rows after)
    id_rows: int = 2000
    #: realistic nights (B=1): rows per night, drawn from the run's rows at each OOD share, and draws
    night_rows: int = 2000
    #: random nights drawn at each OOD share
    night_draws: int = 20
    #: far-OOD examples by URI, name -> uri (a folder, Parquet, s3://, torchvision://...), e.g.
    #: mnist: torchvision://MNIST?split=test&root=DIR; rows_per_source rows of each join the corpus
    ood: dict[str, str] = field(default_factory=dict)
    #: your own in-distribution images (images the model never trained on and not its fit set, e.g. a
    #: folder set aside): id_rows of them are the corpus's in-distribution rows instead of FashionMNIST's,
    #: evaluate.sources is not used, and without evaluate.ood synthetic OOD sets are derived from them
    id_uri: str | None = None
    #: family -> checkpoint to evaluate (default: each family's model.checkpoint)
    checkpoints: dict[str, str] = field(default_factory=dict)
    #: include Bergamin et al.'s per-parameter score statistic (in-process, about 2x a feature pass)
    bergamin: bool = True
    #: flags' false-discovery target in the grid
    fdr: float = 0.05
    #: levels of the calibration table (share of ID rows with p <= alpha)
    alphas: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1])


@dataclass
class EvaluateOutput:
    #: where the grid's tables, report and per-run outputs go
    uri: str = "runs/evaluate"


@dataclass
class EvaluateConfig:
    """The grid's own settings; every other key=value goes to each (family, group size) score-corpus run."""

    #: every random draw derives from the seed and the row id
    seed: int = 0
    output: EvaluateOutput = field(default_factory=EvaluateOutput)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)


T = TypeVar("T")


def load_config(schema: type[T], yaml_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """schema defaults <- each YAML file in order <- CLI dotlist overrides; returns a plain dataclass.

    A YAML may name extra files under a top-level ``defaults: [model/glow]`` list (relative to conf/),
    merged before the file itself; ``model=NAME`` on the command line merges ``conf/model/NAME.yaml``
    (its params replace the earlier family's). Of such a family file only the sections that ``schema``
    has apply (the analyses have no ``train``). A bad key or value raises :class:`ConfigError` with a
    one-line message naming the key (and, for an unknown key, the closest valid ones).
    """
    check_dotlist(overrides)
    try:
        return _compose(schema, yaml_files, overrides)
    except ConfigKeyError as e:
        key = str(e.full_key)  # omegaconf names the first unknown part; the user typed the whole key
        typed = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].startswith(f"{key}.")]
        raise unknown_key(typed[0] if typed else key, setting_keys(schema())) from None
    except (ValidationError, MissingMandatoryValue) as e:
        key = f"{e.full_key}: " if e.full_key else ""
        raise ConfigError(key + str(e).splitlines()[0]) from None
    except ValueError as e:  # a dataclass's own check (__post_init__)
        raise ConfigError(str(e).splitlines()[0]) from None


def _compose(schema: type[T], yaml_files: Sequence[str | Path], overrides: Sequence[str]) -> T:
    merged = OmegaConf.structured(schema)
    sections = {f.name for f in fields(schema)}  # type: ignore[arg-type]

    def family_file(path: Path) -> Any:
        data = OmegaConf.load(path)
        return {k: v for k, v in data.items() if k in sections}

    cli = list(overrides)
    model_shortcut = [o for o in cli if o.startswith("model=")]
    cli = [o for o in cli if not o.startswith("model=")]
    for path in yaml_files:
        data = OmegaConf.load(path)
        for default in data.pop("defaults", []) or []:
            merged = OmegaConf.merge(merged, family_file(CONF_DIR / f"{default}.yaml"))
        merged = OmegaConf.merge(merged, data)
    for item in model_shortcut:
        name = item.split("=", 1)[1]
        path = CONF_DIR / "model" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
            raise ConfigError(f"model={name}: no such family; one of {', '.join(known)}")
        merged.model.params = {}  # dicts merge key by key: another family's params must not leak in
        merged = OmegaConf.merge(merged, family_file(path))
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(cli))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
