import io
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gradood.data import sources
from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, load_rows, open_source

L28 = ImageConverter("L", (28, 28))


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


@pytest.fixture
def image_tree(tmp_path) -> tuple[Path, dict[str, np.ndarray | None]]:
    """Nested folders, mixed-case extensions, non-image and hidden files, one corrupt and one empty file.

    Returns the root and, per image file path, the pixels it should decode to (None: broken).
    """
    root = tmp_path / "corpus"
    images = random_images(6)
    layout = {
        "b.png": (images[0], "PNG"),
        "a/z.PNG": (images[1], "PNG"),
        "a/deep/y.Jpg": (images[2], "JPEG"),
        "a/deep/x.bmp": (images[3], "BMP"),
        "c.WEBP": (images[4], "WEBP"),
        "A.jpeg": (images[5], "JPEG"),
    }
    expected = {}
    for name, (pixels, fmt) in layout.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(pixels, fmt))
        # lossy formats: the reference is PIL's decode of the very same bytes
        expected[str(path)] = np.asarray(Image.open(path).convert("L"))
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "empty.jpg").write_bytes(b"")
    expected[str(root / "a" / "corrupt.png")] = None
    expected[str(root / "empty.jpg")] = None
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "ghost.png").write_bytes(png(images[0]))
    (root / "._resource.png").write_bytes(b"\x00\x05\x16\x07")
    return root, dict(sorted(expected.items()))


def test_folder_source(image_tree):
    root, expected = image_tree
    source = open_source(str(root))
    assert source.num_rows() == len(expected) == 8
    # notes.txt, ._resource.png and .hidden/ghost.png are left out, and counted
    assert source.skipped() == {
        "hidden file": 1,
        "inside a hidden folder": 1,
        "not an image file extension": 1,
    }
    loaded = load_all(source, L28)
    good = [path for path, pixels in expected.items() if pixels is not None]
    assert loaded.ids == good
    np.testing.assert_array_equal(loaded.images[:, 0], np.stack([expected[p] for p in good]))
    order = list(expected)
    np.testing.assert_array_equal(loaded.row_index, [order.index(p) for p in good])
    reasons = {row_id: reason for row_id, _, reason in loaded.errors}
    assert reasons[str(root / "empty.jpg")] == "empty file"
    assert reasons[str(root / "a" / "corrupt.png")].startswith("cannot decode image")
    assert [index for _, index, _ in loaded.errors] == [order.index(p) for p in reasons]


def test_shards_reconcile_and_relative_and_file_uris(image_tree, monkeypatch):
    root, expected = image_tree
    source = open_source(str(root))
    for shard in source.shards(3):
        loaded = load_rows(source, shard, L28)
        assert len(loaded.ids) + len(loaded.errors) == shard.num_rows
    plain = load_all(source, L28)
    for uri in (f"file://{root}", os.path.relpath(root, Path.cwd())):
        other = load_all(open_source(uri), L28)
        assert other.ids == plain.ids and other.errors == plain.errors
        np.testing.assert_array_equal(other.images, plain.images)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images under"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images under"):
        open_source(f"file://{tmp_path / 'text'}")
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="Parquet"):
        open_source(str(tmp_path / "text"), image_column="image")


def test_unreadable_file_is_an_error_row(image_tree):
    root, expected = image_tree
    source = open_source(str(root))
    (shard,) = source.shards(100)
    victim = shard.locator[0]
    os.remove(victim)
    loaded = load_rows(source, shard, L28)
    assert loaded.errors[0][:2] == (victim, 0) and "cannot read file" in loaded.errors[0][2]
    assert len(loaded.ids) + len(loaded.errors) == shard.num_rows


def test_remote_ids_keep_the_scheme():
    mock = pafs._MockFileSystem()
    assert sources.file_id("s3://bucket/dir", mock, "bucket/dir/a.png") == "s3://bucket/dir/a.png"
    assert sources.file_id("hdfs://nn:8020/dir", mock, "/dir/a.png") == "hdfs://nn:8020/dir/a.png"


@pytest.mark.parametrize("align", [1, 5])
def test_shards_alignment_and_ranges(tmp_path, align):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(23):
        (root / f"img-{i:02d}.png").write_bytes(png(random_images(1, seed=i)[0]))
    paths = sorted(str(p) for p in root.iterdir())
    for start, limit in [(0, None), (5, 17), (3, 17), (4, 100), (22, None), (23, None)]:
        source = open_source(str(root), start=start, limit=limit)
        stop = min(23, start + (limit if limit is not None else 23))
        assert source.num_rows() == stop - start
        for shard_size in (1, 4, 7, 12, 50):
            shards = source.shards(shard_size, align=align)
            assert [s.number for s in shards] == list(range(len(shards)))
            covered = [i for s in shards for i in range(s.first_row, s.first_row + s.num_rows)]
            assert covered == list(range(start, stop))
            for shard in shards:
                assert 1 <= shard.num_rows <= max(shard_size, align)
            for shard in shards[:-1]:
                assert (shard.first_row + shard.num_rows) % align == 0
                if start % align == 0:
                    assert shard.num_rows % align == 0
            # groups as consumers form them (index // align) never straddle two shards
            group_shards = {}
            for shard in shards:
                rows = list(source.read_shard(shard))
                assert [r.row_index for r in rows] == list(
                    range(shard.first_row, shard.first_row + shard.num_rows)
                )
                assert [r.id for r in rows] == paths[shard.first_row : shard.first_row + shard.num_rows]
                for r in rows:
                    assert group_shards.setdefault(r.row_index // align, shard.number) == shard.number
    with pytest.raises(ValueError, match="past the end"):
        open_source(str(root), start=24).num_rows()
    with pytest.raises(ValueError, match="non-negative"):
        open_source(str(root), start=-1)


def test_source_pickles_without_its_cache(image_tree):
    root, _ = image_tree
    source = open_source(f"file://{root}")
    shard = source.shards(4)[1]
    clone = pickle.loads(pickle.dumps(source))
    assert clone._cache == {} and clone.uri == source.uri
    assert [r.id for r in clone.read_shard(shard)] == [r.id for r in source.read_shard(shard)]
    assert clone.num_rows() == source.num_rows()


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.mark.parametrize("hf_style", [False, True])
def test_parquet_folder(tmp_path, hf_style):
    images = random_images(12, seed=5)
    payloads = [png(image) for image in images]
    payloads[6] = None  # a null cell
    payloads[8] = b"broken"
    column = (
        pa.array([None if p is None else {"bytes": p, "path": f"{i}.png"} for i, p in enumerate(payloads)])
        if hf_style
        else pa.array(payloads, pa.binary())
    )
    table = pa.table({"label": np.arange(12), "image": column})
    first = write_parquet(tmp_path / "pq" / "part-0.parquet", table.slice(0, 5))
    second = write_parquet(tmp_path / "pq" / "sub" / "part-1.parquet", table.slice(5, 7), row_group_size=2)
    expected_ids = [f"{first}#{i}" for i in range(5)] + [f"{second}#{i}" for i in range(7)]

    source = open_source(str(tmp_path / "pq"))
    assert source.num_rows() == 12 and source.describe()["image_column"] == "image"
    for align, shard_size in [(1, 4), (3, 7), (1, 100)]:
        ids, errors, stacked = [], [], []
        for shard in source.shards(shard_size, align):
            loaded = load_rows(source, shard, L28)
            ids += loaded.ids
            errors += loaded.errors
            stacked.append(loaded.images)
        assert sorted(ids + [e[0] for e in errors]) == sorted(expected_ids)
        good = [i for i in range(12) if i not in (6, 8)]
        assert ids == [expected_ids[i] for i in good]
        np.testing.assert_array_equal(np.concatenate(stacked)[:, 0], images[good])
        assert [(e[0], e[1]) for e in errors] == [(expected_ids[6], 6), (expected_ids[8], 8)]
        assert "null" in errors[0][2] and "not a recognised image format" in errors[1][2]

    limited = load_all(open_source(str(first), start=1, limit=3), L28)
    assert limited.ids == [f"{first}#{i}" for i in (1, 2, 3)]
    np.testing.assert_array_equal(limited.row_index, [1, 2, 3])


def test_parquet_column_selection(tmp_path):
    blob = png(random_images(1)[0])
    table = pa.table(
        {"thumb": pa.array([blob], pa.large_binary()), "full": pa.array([blob], pa.binary()), "n": [1]}
    )
    path = write_parquet(tmp_path / "two.parquet", table)
    with pytest.raises(ValueError, match=r"2 candidates \['thumb', 'full'\]"):
        open_source(str(path))
    assert open_source(str(path), image_column="full").image_column == "full"
    with pytest.raises(ValueError, match=r"'n' is not a binary.*thumb: large_binary"):
        open_source(str(path), image_column="n")
    with pytest.raises(ValueError, match="'nope'"):
        open_source(str(path), image_column="nope")
    write_parquet(tmp_path / "none.parquet", pa.table({"n": [1], "s": ["x"]}))
    with pytest.raises(ValueError, match="0 candidates"):
        open_source(str(tmp_path / "none.parquet"))


def test_mixed_folder_is_ambiguous(tmp_path):
    write_parquet(tmp_path / "t.parquet", pa.table({"image": pa.array([b"x"], pa.binary())}))
    (tmp_path / "a.png").write_bytes(png(random_images(1)[0]))
    with pytest.raises(ValueError, match="both Parquet files and image files"):
        open_source(str(tmp_path))


def test_parquet_shards_cover_every_file_in_order_and_narrow_by_file(tmp_path):
    """Shards located by the files' row offsets hold exactly the rows of the full order, whatever the
    shard size (boundaries inside files, files inside shards, an unreadable file, an empty one)."""
    sizes = [5, 0, 13, 1, 8, 21, 3]
    for f, n in enumerate(sizes):
        images = [png(a) for a in random_images(n, seed=f)]
        pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), tmp_path / f"f{f}.parquet")
    (tmp_path / "f9-broken.parquet").write_bytes(b"not parquet")
    source = open_source(str(tmp_path))
    expected = [f"{tmp_path}/f{f}.parquet#{r}" for f, n in enumerate(sizes) for r in range(n)]
    expected.append(f"{tmp_path}/f9-broken.parquet")
    for shard_size in (1, 4, 7, 100):
        ids = [row.id for shard in source.shards(shard_size) for row in source.read_shard(shard)]
        assert ids == expected
    narrowed = source.with_files([f"{tmp_path}/f5.parquet", f"{tmp_path}/f0.parquet"])
    ids = [row.id for shard in narrowed.shards(6) for row in narrowed.read_shard(shard)]
    assert ids == [f"{tmp_path}/f0.parquet#{r}" for r in range(5)] + [
        f"{tmp_path}/f5.parquet#{r}" for r in range(21)
    ]
