"""Training: reproducible order and noise, sharding, warmup, exact resume, and the Ray Train job itself
(end to end through train_model, resume of a stopped run without re-running the ActNorm init)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from ray.train import Checkpoint

from gradood.config import CONF_DIR, ModelConfig, TrainConfig, TrainJobConfig, load_config
from gradood.models import build_model
from gradood.models.checkpoint import load_checkpoint, model_fingerprint
from gradood.models.glow import ActNorm
from gradood.seeding import row_seed
from gradood.train.loop import EpochRunner, epoch_order, init_from_data, load_train_rows, row_noise, warmup_lr
from gradood.train.worker import TrainingLoss, read_checkpoint, write_checkpoint

TINY_GLOW = dict(num_steps=1, hidden_channels=8)


def tiny_config(tmp_path, **train) -> TrainJobConfig:
    settings = dict(
        limit=128, epochs=2, batch_size=32, lr=3e-3, warmup_steps=2, init_rows=64, cpus_per_worker=1,
        storage_path=str(tmp_path / "runs"),
    )  # fmt: skip
    return TrainJobConfig(
        seed=3,
        model=ModelConfig(name="glow", params=dict(TINY_GLOW), checkpoint=str(tmp_path / "model")),
        train=TrainConfig(**{**settings, **train}),
    )


def fresh(cfg: TrainJobConfig):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, cfg.model.params)
    return model, load_train_rows(cfg, model)


def runner_for(model, cfg: TrainJobConfig) -> EpochRunner:
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    return EpochRunner(model, TrainingLoss(model), optimizer, cfg, cfg.train.batch_size, torch.device("cpu"))


def float64_bpd(model, images: torch.Tensor, noise: dict[str, torch.Tensor]) -> float:
    """Mean bits/dim straight from log_prob in float64: independent of the loss the loop reports."""
    model = model.double().eval()
    with torch.no_grad():
        log_prob = model.log_prob(images.double(), {k: v.double() for k, v in noise.items()})
    return float(-log_prob.mean() / (math.prod(model.input_shape) * math.log(2)))


# --- pieces of the loop -------------------------------------------------------------------------


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    order = epoch_order(1000, seed=7, epoch=2)
    np.testing.assert_array_equal(np.sort(order.numpy()), np.arange(1000))
    assert torch.equal(order, epoch_order(1000, seed=7, epoch=2))
    assert not torch.equal(order, epoch_order(1000, seed=7, epoch=3))
    assert not torch.equal(order, epoch_order(1000, seed=8, epoch=2))


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


def test_rank_strided_shards_partition_the_rows(tmp_path):
    cfg = tiny_config(tmp_path, limit=103)
    _, rows = fresh(cfg)
    shards = [rows.shard(rank, 4) for rank in range(4)]
    assert {len(s) for s in shards} == {25}  # 103 // 4: equal step counts on every rank
    assert sorted(i for s in shards for i in s.ids) == sorted(rows.ids[:100])
    for rank, shard in enumerate(shards):
        assert shard.ids == rows.ids[rank:100:4]
        torch.testing.assert_close(shard.images, rows.images[rank:100:4], rtol=0, atol=0)


def test_warmup_is_linear_then_flat():
    lrs = [warmup_lr(step, 1e-3, 4) for step in range(6)]
    np.testing.assert_allclose(lrs, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert warmup_lr(0, 1e-3, 0) == 1e-3


def test_training_lowers_float64_bpd_and_is_reproducible(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3)
    fingerprints, bpds = [], []
    for _ in range(2):
        model, rows = fresh(cfg)
        init_from_data(model, rows, cfg)
        probe = row_noise(model, rows.ids, cfg.seed, "probe")
        before = float64_bpd(model.float(), rows.images.float(), probe)
        model.float()
        runner = runner_for(model, cfg)
        step, reported = 0, []
        for epoch in range(1, cfg.train.epochs + 1):
            stats, step = runner.run(rows, epoch, step)
            reported.append(stats.train_bpd)
        assert step == 3 * 4 and stats.rows == 128 and stats.steps == 4
        fingerprints.append(model_fingerprint(model))
        after = float64_bpd(model, rows.images.float(), probe)
        bpds.append(after)
        assert after < before - 0.05, (before, after)
        assert reported[-1] < reported[0]
    assert fingerprints[0] == fingerprints[1] and bpds[0] == bpds[1]


def test_resume_from_a_checkpoint_equals_training_straight_through(tmp_path):
    cfg = tiny_config(tmp_path)
    model, rows = fresh(cfg)
    init_from_data(model, rows, cfg)
    runner = runner_for(model, cfg)
    stats, step = runner.run(rows, 1, 0)
    write_checkpoint(
        str(tmp_path / "ckpt"), model, runner.optimizer, step, [{"epoch": 1, "train_bpd": 1.0}], cfg, rows
    )
    runner.run(rows, 2, step)

    resumed, _ = fresh(cfg)  # a new process: fresh weights, no data init, state from the checkpoint only
    weights, state = read_checkpoint(Checkpoint.from_directory(str(tmp_path / "ckpt")))
    resumed.load_state_dict(weights)
    assert all(bool(m.initialized) for m in resumed.modules() if isinstance(m, ActNorm))
    resumed_runner = runner_for(resumed, cfg)
    resumed_runner.optimizer.load_state_dict(state["optimizer"])
    assert state["epoch"] == 1 and state["step"] == step == 4
    resumed_runner.run(rows, 2, state["step"])
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
    assert cfg.model.checkpoint.endswith("/" + cfg.train.name)  # exported where its run is named
    assert cfg.train.batch_size % cfg.train.num_workers == 0


def test_shipped_checkpoint_matches_the_default_config():
    cfg = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"])
    _, meta = load_checkpoint(CONF_DIR.parent / cfg.model.checkpoint)
    assert meta["params"] == build_model(cfg.model.name, cfg.model.params).hparams()
    trained_with = meta["training"]["config"]
    weight_settings = (
        "uri",
        "limit",
        "epochs",
        "batch_size",
        "lr",
        "warmup_steps",
        "weight_decay",
        "grad_clip",
    )
    assert trained_with["seed"] == cfg.seed
    assert {k: trained_with["train"][k] for k in weight_settings} == {
        k: getattr(cfg.train, k) for k in weight_settings
    }


# --- the Ray Train job --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_worker_run(ray_local, tmp_path_factory):
    """Two epochs on two DDP workers, through the same train_model the job script calls."""
    from gradood.train import train_model

    cfg = tiny_config(tmp_path_factory.mktemp("train"), num_workers=2, name="e2e")
    return cfg, train_model(cfg)


@pytest.mark.slow
def test_train_model_two_workers_end_to_end(two_worker_run):
    cfg, result = two_worker_run
    assert result.metrics["run"]["epochs_run"] == [1, 2] and result.metrics["run"]["initialized_from_data"]
    assert result.metrics["epoch"] == 2 and result.metrics["rows"] == 128
    model, meta = load_checkpoint(result.checkpoint_dir)
    assert meta["fingerprint"] == result.fingerprint == model_fingerprint(model)
    training = meta["training"]
    assert training["epochs_done"] == 2 and training["data"]["rows"] == 128
    assert [h["epoch"] for h in training["history"]] == [1, 2]
    assert training["train_bpd"] == result.metrics["train_bpd"]
    assert training["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))

    untrained, rows = fresh(cfg)
    init_from_data(untrained, rows, cfg)
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
    model, meta = load_checkpoint(second.checkpoint_dir)
    assert meta["training"]["epochs_done"] == 3
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))
