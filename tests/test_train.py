"""Training: noise, warmup, the Ray Data input path (rows split between workers, each once per epoch),
reproducible and exact-resume epochs, and the Ray Train job itself (end to end through train_model,
with URI storage, resume of a stopped run without re-running the ActNorm init)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from ray.train import Checkpoint

from gradood.config import CONF_DIR, ModelConfig, ScoreCorpusConfig, TrainConfig, TrainJobConfig, load_config
from gradood.core.cli import RENAMED_KEYS
from gradood.models import build_model
from gradood.models.checkpoint import load_checkpoint, model_fingerprint
from gradood.models.glow import ActNorm
from gradood.seeding import row_seed
from gradood.train.data import (
    PRESET_SIZES,
    data_config,
    epoch_batches,
    leading_rows,
    model_converter,
    preset_size,
    shape_from_data,
    train_dataset,
    train_sources,
)
from gradood.train.loop import EpochRunner, TrainBatch, init_from_data, row_noise, warmup_lr
from gradood.train.trainer import export_checkpoint, run_name
from gradood.train.worker import BestEpoch, TrainingLoss, read_checkpoint, write_checkpoint

TINY_GLOW = dict(num_steps=1, hidden_channels=8)


def tiny_config(tmp_path, **train) -> TrainJobConfig:
    settings = dict(
        size=128, epochs=2, batch_size=32, lr=3e-3, warmup_steps=2, init_rows=64, cpus_per_worker=1,
        runs_uri=str(tmp_path / "runs"), holdout_fraction=0.0, eval_rows=64,
    )  # fmt: skip
    return TrainJobConfig(
        seed=3,
        model=ModelConfig(name="glow", params=dict(TINY_GLOW), checkpoint=str(tmp_path / "model")),
        train=TrainConfig(**{**settings, **train}),
    )


def fresh(cfg: TrainJobConfig):
    """A freshly initialised model (as a worker builds it) and every training row, read directly."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, cfg.model.params)
    return model, leading_rows(train_sources(cfg)[0], model_converter(model, cfg), cfg.train.size)


def runner_for(model, cfg: TrainJobConfig) -> EpochRunner:
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    return EpochRunner(model, TrainingLoss(model), optimizer, cfg, torch.device("cpu"))


def float64_bpd(model, images: torch.Tensor, noise: dict[str, torch.Tensor]) -> float:
    """Mean bits/dim straight from log_prob in float64: independent of the loss the loop reports."""
    model = model.double().eval()
    with torch.no_grad():
        log_prob = model.log_prob(images.double(), {k: v.double() for k, v in noise.items()})
    return float(-log_prob.mean() / (math.prod(model.input_shape) * math.log(2)))


# --- pieces of the loop -------------------------------------------------------------------------


def test_row_noise_depends_on_seed_row_and_epoch_only():
    model = build_model("glow", TINY_GLOW)
    ids = [f"FashionMNIST:train:{i}" for i in range(6)]
    batch = row_noise(model, ids, seed=5, tag="epoch1")["dequant"]
    # the same row gets the same draw alone, in another batch and in another order
    shuffled = row_noise(model, ids[::-1], seed=5, tag="epoch1")["dequant"]
    torch.testing.assert_close(shuffled, batch.flip(0), rtol=0, atol=0)
    for i, rid in enumerate(ids):
        # independent reference: one float64 uniform draw from a generator seeded by (seed, id@epoch)
        gen = torch.Generator().manual_seed(row_seed(5, f"{rid}@epoch1", "dequant"))
        expected = torch.rand(model.input_shape, generator=gen, dtype=torch.float64).float()
        torch.testing.assert_close(batch[i], expected, rtol=0, atol=0)
    assert 0 <= batch.min() and batch.max() < 1
    other_epoch = row_noise(model, ids, seed=5, tag="epoch2")["dequant"]
    other_seed = row_noise(model, ids, seed=6, tag="epoch1")["dequant"]
    assert not torch.equal(other_epoch, batch) and not torch.equal(other_seed, batch)


def test_warmup_is_linear_then_flat():
    lrs = [warmup_lr(step, 1e-3, 4) for step in range(6)]
    np.testing.assert_allclose(lrs, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert warmup_lr(0, 1e-3, 0) == 1e-3


# --- the Ray Data input path, in this process -----------------------------------------------------


@pytest.fixture(scope="module")
def dataset(local_ray, tmp_path_factory):
    """The training Dataset of the tiny config, in 3 blocks so that shuffling and splitting have blocks to
    move, and every row read directly for comparison."""
    cfg = tiny_config(tmp_path_factory.mktemp("data"), size=100)
    model, rows = fresh(cfg)
    data = train_dataset(cfg, model, rows_per_block=40)
    return cfg, data.dataset, data.init, data.origin, rows


def test_dataset_holds_the_decoded_rows_shuffled_by_the_seed(dataset):
    cfg, ds, init, origin, rows = dataset
    assert origin["num_rows"] == 100 and origin["blocks"] == 3 and origin["kind"] == "torchvision"
    batches = list(epoch_batches(ds.iterator(), 32, cfg.seed, epoch=1))
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    ids = [i for b in batches for i in b.ids]
    assert sorted(ids) == sorted(rows.ids) and ids != rows.ids  # every row once, not in source order
    by_id = dict(zip(rows.ids, rows.images, strict=True))
    for batch in batches:
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (1, 28, 28)
        for rid, index, image in zip(batch.ids, batch.row_index.tolist(), batch.images, strict=True):
            assert rid == f"FashionMNIST:train:{index}"
            torch.testing.assert_close(image, by_id[rid], rtol=0, atol=0)
    # the same epoch again gives the same batches; the next epoch another order of the same rows
    again = [i for b in epoch_batches(ds.iterator(), 32, cfg.seed, epoch=1) for i in b.ids]
    epoch2 = [i for b in epoch_batches(ds.iterator(), 32, cfg.seed, epoch=2) for i in b.ids]
    assert again == ids and epoch2 != ids and sorted(epoch2) == sorted(ids)
    # the init rows: the first init_rows in source order, decoded on the driver
    assert init.ids == rows.ids[: cfg.train.init_rows]
    torch.testing.assert_close(init.images, rows.images[: cfg.train.init_rows], rtol=0, atol=0)


def test_undecodable_rows_drop_out_of_the_dataset(local_ray, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")
    cfg = tiny_config(tmp_path, uri=str(folder), size=None, init_rows=4)
    data = train_dataset(cfg, build_model("glow", TINY_GLOW), rows_per_block=2)
    ds, init, origin = data.dataset, data.init, data.origin
    assert origin["num_rows"] == 6 and origin["blocks"] == 3 and data.held_out is None
    names = [i.rsplit("/", 1)[1] for b in epoch_batches(ds.iterator(), 8, cfg.seed, epoch=1) for i in b.ids]
    assert sorted(names) == ["0.png", "1.png", "2.png", "4.png", "5.png"]
    assert [i.rsplit("/", 1)[1] for i in init.ids] == ["0.png", "1.png", "2.png", "4.png"]


def test_training_lowers_float64_bpd_and_is_reproducible(dataset):
    cfg, ds, init, _, rows = dataset
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    fingerprints, bpds = [], []
    for _ in range(2):
        model, _ = fresh(cfg)
        init_from_data(model, init, cfg)
        probe = row_noise(model, rows.ids, cfg.seed, "probe")
        before = float64_bpd(model.float(), rows.images.float(), probe)
        model.float()
        runner = runner_for(model, cfg)
        step, reported = 0, []
        for epoch in range(1, cfg.train.epochs + 1):
            stats, step = runner.run(epoch_batches(ds.iterator(), 32, cfg.seed, epoch), epoch, step)
            reported.append(stats.train_loss)
        assert step == 3 * 4 and stats.rows == 100 and stats.steps == 4
        fingerprints.append(model_fingerprint(model))
        after = float64_bpd(model, rows.images.float(), probe)
        bpds.append(after)
        assert after < before - 0.05, (before, after)
        assert reported[-1] < reported[0]
    assert fingerprints[0] == fingerprints[1] and bpds[0] == bpds[1]


def test_resume_from_a_checkpoint_equals_training_straight_through(dataset, tmp_path):
    cfg, ds, init, origin, _ = dataset
    model, _ = fresh(cfg)
    init_from_data(model, init, cfg)
    runner = runner_for(model, cfg)
    stats, step = runner.run(epoch_batches(ds.iterator(), 32, cfg.seed, 1), 1, 0)
    best = BestEpoch(1, None, model.state_dict())
    history = [{"epoch": 1, "train_loss": 1.0}]
    write_checkpoint(str(tmp_path / "ckpt"), model, runner.optimizer, step, history, best, cfg, origin)
    runner.run(epoch_batches(ds.iterator(), 32, cfg.seed, 2), 2, step)

    resumed, _ = fresh(cfg)  # a new process: fresh weights, no data init, state from the checkpoint only
    weights, state = read_checkpoint(Checkpoint.from_directory(str(tmp_path / "ckpt")))
    resumed.load_state_dict(weights)
    assert all(bool(m.initialized) for m in resumed.modules() if isinstance(m, ActNorm))
    resumed_runner = runner_for(resumed, cfg)
    resumed_runner.optimizer.load_state_dict(state["optimizer"])
    assert state["epoch"] == 1 and state["step"] == step == 4
    resumed_runner.run(epoch_batches(ds.iterator(), 32, cfg.seed, 2), 2, state["step"])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert model_fingerprint(resumed) == model_fingerprint(model)


def test_fingerprint_follows_the_weights(tmp_path):
    model, _ = fresh(tiny_config(tmp_path))
    before = model_fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert model_fingerprint(model) != before


@pytest.mark.parametrize("name", ["train.yaml", "train_quality.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(TrainJobConfig, [CONF_DIR / name])
    build_model(cfg.model.name, cfg.model.params)
    assert cfg.model.checkpoint.endswith("/" + run_name(cfg))  # exported where its run is named
    assert cfg.train.batch_size % cfg.train.num_workers == 0


#: the rows each shipped checkpoint trained on: the first train.size FashionMNIST train rows, the rows
#: after them held out (its COMMAND.md); everything else is the family's default
SHIPPED_ROWS = {"glow": 50000, "ddpm": 30000, "vae": 50000, "pixelcnn": 50000, None: 50000}


@pytest.mark.parametrize("family", [None, "glow", "ddpm", "vae", "pixelcnn"])
def test_shipped_checkpoint_matches_the_default_config(family):
    """Every shipped checkpoint's weights come from its family's default training settings and the rows
    its COMMAND.md names (None: the training job without model=)."""
    rows = [f"train.size={SHIPPED_ROWS[family]}", "train.holdout_fraction=0"]
    cfg = load_config(
        TrainJobConfig, [CONF_DIR / "train.yaml"], rows + ([] if family is None else [f"model={family}"])
    )
    _, meta = load_checkpoint(CONF_DIR.parent / cfg.model.checkpoint)
    assert meta["params"] == build_model(cfg.model.name, cfg.model.params).hparams()
    trained_with = meta["training"]["config"]
    weight_settings = (
        "uri",
        "size",
        "holdout_fraction",
        "epochs",
        "batch_size",
        "lr",
        "warmup_steps",
        "weight_decay",
        "grad_clip",
    )
    assert trained_with["seed"] == cfg.seed
    renamed = {new.split(".")[1]: old.split(".")[1] for old, new in RENAMED_KEYS.items()}
    recorded = {"holdout_fraction": 0.0, **trained_with["train"]}  # as the job named its keys then
    assert {k: recorded[k] if k in recorded else recorded[renamed[k]] for k in weight_settings} == {
        k: getattr(cfg.train, k) for k in weight_settings
    }


@pytest.mark.parametrize("family", ["glow", "ddpm", "vae", "pixelcnn"])
def test_no_shipped_checkpoint_trained_on_the_default_fit_and_calibration_rows(family):
    """The detector's held-out rows must be rows the model never saw, or its p-values are not valid: the
    default fit set (the rows after the checkpoint's training rows) lies outside every checkpoint's
    recorded training rows."""
    from gradood.pipeline.fit import fit_set_warnings, fit_source

    cfg = load_config(ScoreCorpusConfig, [CONF_DIR / "score_corpus.yaml"], [f"model={family}"])
    _, meta = load_checkpoint(CONF_DIR.parent / cfg.model.checkpoint)
    data = meta["training"]["data"]
    source = fit_source(cfg.fit, meta)
    assert cfg.fit.uri is None and source.uri == data["uri"]
    trained = range(data["start"], data["start"] + data["rows"])
    held_out = range(source.start, source.start + source.num_rows())
    assert held_out == range(SHIPPED_ROWS[family], SHIPPED_ROWS[family] + cfg.fit.size)
    assert trained.stop <= held_out.start or held_out.stop <= trained.start, (trained, held_out)
    assert fit_set_warnings(meta, source) == []


def test_the_exported_checkpoint_is_the_best_epoch(tmp_path):
    """A run checkpoint carries the weights of the best epoch so far besides its own; the export takes
    those, with the model card naming that epoch."""
    cfg = tiny_config(tmp_path)
    model, rows = fresh(cfg)
    init_from_data(model, TrainBatch(rows.ids[:64], rows.row_index[:64], rows.images[:64]), cfg)
    best_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0  # epoch 2: other weights, a worse held-out loss
    history = [
        {"epoch": 1, "train_loss": 3.0, "heldout_loss": 2.5, "rows_per_s": 1.0, "seconds": 4.0},
        {"epoch": 2, "train_loss": 2.0, "heldout_loss": 2.7, "rows_per_s": 1.0, "seconds": 5.0},
    ]
    best = BestEpoch(1, 2.5, best_weights)
    assert not best.improved_by(2.7) and best.improved_by(2.4)
    optimizer = torch.optim.Adam(model.parameters())
    data = {"uri": cfg.train.uri, "rows": 128, "heldout_loss_rows": 64}
    write_checkpoint(str(tmp_path / "run"), model, optimizer, 8, history, best, cfg, data)
    fp = export_checkpoint(tmp_path / "run", str(tmp_path / "export"), extra={})
    exported, meta = load_checkpoint(tmp_path / "export")
    assert fp == meta["fingerprint"] == model_fingerprint(exported) != model_fingerprint(model)
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, best_weights[name], rtol=0, atol=0, msg=name)
    card = meta["training"]["card"]
    assert (card["epoch"], card["heldout_loss"], card["train_loss"], card["epochs_run"]) == (1, 2.5, 3.0, 2)
    assert (card["training_rows"], card["heldout_loss_rows"], card["seconds"]) == (128, 64, 9.0)


# --- the Ray Train job --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_worker_run(local_ray, tmp_path_factory):
    """Two epochs on two DDP workers, through the same train_model the job script calls, with the run
    storage and the export given as file:// URIs (the form of s3://... that needs no server)."""
    from gradood.train import train_model

    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_config(tmp, num_workers=2, name="e2e", runs_uri=f"file://{tmp}/runs")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=f"file://{tmp}/model"))
    return cfg, train_model(cfg)


@pytest.mark.slow
def test_train_model_two_workers_end_to_end(two_worker_run):
    cfg, result = two_worker_run
    assert result.metrics["run"]["epochs_run"] == [1, 2] and result.metrics["run"]["initialized_from_data"]
    # rows: all ranks' rows of the epoch, from the Ray Data shards; steps: one rank's, 64 rows / 16 each
    assert result.metrics["epoch"] == 2 and result.metrics["rows"] == 128 and result.metrics["steps"] == 4
    tmp = cfg.model.checkpoint.removeprefix("file://").rsplit("/", 1)[0]
    assert result.checkpoint_dir == cfg.model.checkpoint and result.metrics["ray_run"].endswith("/runs/e2e")
    model, meta = load_checkpoint(f"{tmp}/model")
    assert meta["fingerprint"] == result.fingerprint == model_fingerprint(model)
    training = meta["training"]
    assert training["epochs_done"] == 2 and training["data"]["rows"] == 128
    assert training["data"]["skipped"] == 0 and training["data"]["blocks"] == 1
    assert [h["epoch"] for h in training["history"]] == [1, 2]
    assert training["train_loss"] == result.metrics["train_loss"]
    assert training["loss"] == "bits/dim"
    # the config as run: the input shape the data gave (model.params leaves it out) recorded with it
    shaped = dataclasses.replace(cfg.model, params={**cfg.model.params, "in_channels": 1, "image_size": 28})
    assert training["config"] == json.loads(
        json.dumps(dataclasses.asdict(dataclasses.replace(cfg, model=shaped)))
    )

    untrained, rows = fresh(cfg)
    init_from_data(untrained, TrainBatch(rows.ids[:64], rows.row_index[:64], rows.images[:64]), cfg)
    probe = row_noise(untrained, rows.ids, cfg.seed, "probe")
    assert float64_bpd(model, rows.images, probe) < float64_bpd(untrained, rows.images, probe) - 0.05


@pytest.mark.slow
def test_rerun_resumes_only_missing_epochs_without_data_init(two_worker_run):
    from gradood.train import train_model

    cfg, first = two_worker_run
    # same run name and storage, one more epoch, on one worker this time. lr 0: epoch 3 cannot move the
    # weights, so they must be epoch 2's exactly; a fresh start or a re-run ActNorm init would change them
    train = dataclasses.replace(cfg.train, epochs=3, lr=0.0, num_workers=1)
    second = train_model(dataclasses.replace(cfg, train=train))
    run = second.metrics["run"]
    assert run["epochs_run"] == [3] and not run["initialized_from_data"]
    assert second.metrics["start_epoch"] == 3 and [h["epoch"] for h in run["history"]] == [1, 2, 3]
    assert second.fingerprint == first.fingerprint
    model, meta = load_checkpoint(second.checkpoint_dir.removeprefix("file://"))
    assert meta["training"]["epochs_done"] == 3
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))


@pytest.mark.slow
def test_training_holds_rows_out_measures_them_and_stops_early(local_ray, tmp_path):
    """A quarter of the rows held out by the rule: never trained on, the held-out loss measured on them
    every epoch (checked against the exported model here), and with lr 0 no epoch beats the first, so
    patience 1 stops after epoch 2 and the export is epoch 1's."""
    from gradood.data.holdout import HeldOutSplit, HoldoutRule, Side
    from gradood.data.sources import open_source
    from gradood.train import train_model

    cfg = tiny_config(tmp_path, size=96, holdout_fraction=0.25, eval_rows=64, epochs=4, lr=0.0, patience=1)
    result = train_model(cfg)
    run = result.metrics["run"]
    assert run["epochs_run"] == [1, 2]
    losses = [h["heldout_loss"] for h in run["history"]]
    assert losses[0] == losses[1] and math.isfinite(losses[0])

    model, meta = load_checkpoint(cfg.model.checkpoint)
    data, card = meta["training"]["data"], meta["training"]["card"]
    held = HeldOutSplit(open_source(cfg.train.uri, limit=96), HoldoutRule(0.25, cfg.seed), Side.held_out)
    assert data["holdout"] == {**HoldoutRule(0.25, cfg.seed).to_dict(), "side": "training",
                               "start": 0, "limit": None}  # fmt: skip
    assert data["rows"] == 96 - held.num_rows() and data["source_rows"] == 96
    assert (card["epoch"], card["epochs_run"], card["heldout_loss_rows"]) == (1, 2, held.num_rows())
    rows = leading_rows(held, model_converter(model, cfg), 64)
    with torch.no_grad():
        expected = model.eval().training_loss(
            rows.images.float(), row_noise(model, rows.ids, cfg.seed, "heldout")
        )
    assert card["heldout_loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_ray_train_workers_get_disjoint_shares_each_row_once_per_epoch(local_ray, tmp_path):
    """The Dataset, the data config and the per-epoch iteration the job uses, on two Ray Train workers:
    every epoch each rank gets an equal share, the shares are disjoint and cover every row once, and the
    assignment is the same in both epochs (the split is deterministic), the order within it not."""
    import ray.train
    import torch.distributed as dist
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = tiny_config(tmp_path, size=90)
    ds = train_dataset(cfg, build_model("glow", TINY_GLOW), rows_per_block=20).dataset

    def probe(config):
        rank = ray.train.get_context().get_world_rank()
        shard = ray.train.get_dataset_shard("train")
        seen = []
        for epoch in (1, 2):
            batches = list(epoch_batches(shard, 8, config["seed"], epoch, rank))
            seen.append([[int(i) for i in b.row_index] for b in batches])
        gathered = [None, None]
        dist.all_gather_object(gathered, seen)
        return gathered

    trainer = TorchTrainer(
        probe,
        train_loop_config={"seed": cfg.seed},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="probe", storage_path=str(tmp_path / "runs")),
        datasets={"train": ds},
        dataset_config=data_config(),
    )
    by_rank = trainer.fit().return_value  # [rank][epoch][batch] -> row indices
    for epoch in (0, 1):
        shares = [[i for batch in by_rank[rank][epoch] for i in batch] for rank in (0, 1)]
        assert [len(s) for s in shares] == [45, 45]
        assert [len(b) for b in by_rank[0][epoch]] == [len(b) for b in by_rank[1][epoch]]  # same steps
        assert sorted(shares[0] + shares[1]) == list(range(90))  # disjoint, every row once
    for rank in (0, 1):
        first, second = ([i for b in by_rank[rank][e] for i in b] for e in (0, 1))
        assert sorted(first) == sorted(second) and first != second


# --- the input shape from the data ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["vae", "glow", "ddpm", "pixelcnn"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", PRESET_SIZES)
def test_every_family_builds_at_every_preset_shape(family, channels, size):
    """The family's own widths (its YAML) at each shape the data can pick: a finite log p per row."""
    cfg = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"], [f"model={family}"])
    model = build_model(family, {**cfg.model.params, "in_channels": channels, "image_size": size})
    model.init_from_data(torch.full((2, channels, size, size), 128.0), draw_noise_for(model, 2))
    model.prepare_for_scoring()
    with torch.no_grad():
        log_prob = model.log_prob(torch.full((2, channels, size, size), 100.0), draw_noise_for(model, 2))
    assert log_prob.shape == (2,) and torch.isfinite(log_prob).all()


def draw_noise_for(model, n: int) -> dict[str, torch.Tensor]:
    return row_noise(model, [f"r{i}" for i in range(n)], seed=0, tag="shape")


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [("L", (28, 28), (1, 28)), ("RGB", (48, 32), (3, 32)), ("RGBA", (200, 120), (3, 64)),
     ("L", (20, 24), (1, 28)), ("P", (40, 40), (3, 32))],
)  # fmt: skip
def test_the_input_shape_comes_from_the_first_decodable_image(tmp_path, mode, size, expected):
    from PIL import Image

    (tmp_path / "a.png").write_bytes(b"not an image")  # skipped: undecodable
    Image.new(mode, size).save(tmp_path / "b.png")
    cfg = tiny_config(tmp_path, uri=str(tmp_path), size=None)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, params={}))
    source = train_sources(cfg)[0]
    assert shape_from_data(cfg, source) == {"in_channels": expected[0], "image_size": expected[1]}
    given = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, params={"image_size": 64}))
    assert shape_from_data(given, source) == {"in_channels": expected[0]}  # model.params wins
    assert [preset_size(s) for s in (10, 28, 31, 32, 63, 64, 1000)] == [28, 28, 28, 32, 32, 64, 64]
