"""The README's "Screen your own images" commands, run as written on a small RGB corpus that is not
28x28 (crops of scikit-learn's sample photos, some rectangular): train with a held-out share, then two
incremental nights whose detector is fitted on the held-out images; on local disk and with every
location (images, lake, model, outputs) on the local S3 server."""

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from gradood.core import storage
from gradood.data.fashion_mnist import load_fashion_mnist
from gradood.data.holdout import HoldoutRule
from gradood.data.sources import open_source

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The commands between the README's own-images markers, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- own-images:begin -->(.*?)<!-- own-images:end -->", text, re.S).group(1)
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.strip() for line in joined.splitlines() if line.strip()]


def photo_crops(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` crops of the sample photos, 32x32 and (one in four) 48x32, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        photo = photos[k % len(photos)]
        width = 48 if k % 4 == 0 else 32
        y, x = rng.integers(0, photo.shape[0] - 32), rng.integers(0, photo.shape[1] - width)
        path = folder / f"crop-{seed}-{k:03d}.png"
        Image.fromarray(photo[y : y + 32, x : x + width]).save(path)
        paths.append(path)
    return paths


def garments(folder: Path, rows: range) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images = load_fashion_mnist("test")[0]
    for row in rows:
        Image.fromarray(images[row]).save(folder / f"garment-{row}.png")


def run(command: str, env: dict[str, str], extra: str = "") -> str:
    done = subprocess.run(
        f"{command} {extra}", shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


class Place:
    """Where the test's folders live: under a local folder, or under a bucket of the local S3 server
    (written there with boto3 from a local staging folder)."""

    def __init__(self, tmp_path: Path, bucket: str | None):
        self.tmp, self.bucket = tmp_path, bucket
        if bucket is not None:
            import boto3

            self.client = boto3.client("s3")
            self.client.create_bucket(Bucket=bucket)

    def uri(self, name: str) -> str:
        return str(self.tmp / name) if self.bucket is None else f"s3://{self.bucket}/{name}"

    def staged(self, name: str) -> Path:
        return self.tmp / "staging" / name if self.bucket else self.tmp / name

    def publish(self, name: str) -> None:
        """Upload the staged files of ``name`` that are not in the bucket yet."""
        if self.bucket is None:
            return
        for path in sorted(self.staged(name).iterdir()):
            key = f"{name}/{path.name}"
            if self.client.list_objects_v2(Bucket=self.bucket, Prefix=key)["KeyCount"] == 0:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=path.read_bytes())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_readme_own_images_commands_train_then_screen_two_nights(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_server")  # the endpoint reaches the jobs through the environment
    place = Place(tmp_path, None if where == "local" else f"own-{uuid.uuid4().hex[:8]}")
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["jobs/train.py", "jobs/evaluate.py", "jobs/score_corpus.py"]
    photo_crops(place.staged("images"), 400, seed=1)
    photo_crops(place.staged("set_aside"), 60, seed=4)
    garments(place.staged("odd"), range(100, 120))
    photo_crops(place.staged("lake"), 24, seed=2)
    garments(place.staged("lake"), range(3))
    for name in ("images", "set_aside", "odd", "lake"):
        place.publish(name)
    model = place.uri(f"model-{uuid.uuid4().hex[:8]}")  # its name is the Ray Train run's
    out = place.uri("out")
    env = {
        **os.environ,
        "IMAGES": place.uri("images"),
        "LAKE": place.uri("lake"),
        "MODEL": model,
        "OUT": out,
        "SET_ASIDE": place.uri("set_aside"),
        "ODD": place.uri("odd"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    printed = run(commands[0], env, f"train.epochs=2 train.runs_uri={tmp_path / 'ray_train'}")
    assert "model card: vae, epoch" in printed and "held-out:" in printed

    meta = storage.read_json(storage.join(model, "model.json"))
    training = meta["training"]
    assert meta["params"]["in_channels"] == 3 and meta["params"]["image_size"] == 32
    ids = open_source(place.uri("images")).row_ids(0, 400)
    held = {i for i, out in zip(ids, HoldoutRule(0.1, 0).held_out(ids), strict=True) if out}
    assert training["data"]["holdout"]["fraction"] == 0.1 and 20 < len(held) < 80
    assert training["data"]["rows"] == 400 - len(held) and training["card"]["heldout_loss_rows"] == len(held)
    assert [h["epoch"] for h in training["history"]] == [1, 2]
    assert all(np.isfinite(h["heldout_loss"]) for h in training["history"])
    best = min(training["history"], key=lambda h: h["heldout_loss"])
    assert (
        training["card"]["epoch"] == best["epoch"] and training["card"]["fingerprint"] == meta["fingerprint"]
    )

    evaluation = tmp_path / "evaluate"
    printed = run(commands[1], env, f"output.uri={evaluation} evaluate.night_draws=2")
    assert "Recommended family: vae" in printed
    metrics = pq.read_table(evaluation / "metrics.parquet").to_pandas()
    assert (
        set(metrics["source"]) == {"odd"} and set(metrics["n_id"]) == {60} and set(metrics["n_ood"]) == {20}
    )
    assert (evaluation / "report.html").is_file() and (evaluation / "nights.md").is_file()
    nights = pq.read_table(evaluation / "nights.parquet").to_pandas()  # of 60 rows: 0.5 % is no OOD row
    assert set(nights["n_rows"]) == {60} and set(nights["prevalence"]) == {0.01, 0.02, 0.05, 0.1}

    run(commands[2], env, "run.id=night-1")
    detector = storage.read_json(storage.join(out, "detector.json"))
    assert detector["fit"]["warnings"] == [] and detector["fit"]["uri"] is None
    assert detector["fit"]["source"]["holdout"]["side"] == "held_out"
    fit_ids = storage.read_parquet(storage.join(out, "fit", "features")).column("id").to_pylist()
    assert set(fit_ids) == held  # fitted and calibrated on exactly the held-out images
    first = storage.read_json(storage.join(out, "runs", "night-1", "summary.json"))
    assert (first["inputs"], first["scored"], first["rejected"]) == (27, 27, 0)

    photo_crops(place.staged("lake"), 8, seed=3)  # the next night's new files
    garments(place.staged("lake"), range(3, 5))
    place.publish("lake")
    run(commands[2], env, "run.id=night-2")
    second = storage.read_json(storage.join(out, "runs", "night-2", "summary.json"))
    assert (second["inputs"], second["scored"]) == (10, 10)
    scored = storage.read_parquet(storage.join(out, "runs", "night-2", "scores")).column("id").to_pylist()
    assert all(("crop-3-" in i) or ("garment-3" in i) or ("garment-4" in i) for i in scored)
