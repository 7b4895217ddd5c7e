"""A zoo of bad (and oddly good) inputs: every file found is decoded, an error row with a reason, or skipped.

Each entry states its exact outcome; the totals must reconcile: decoded + errors = inputs and
inputs + skipped = entries found on disk.
"""

import io
import os
import re
import socket
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gradood.config import CONF_DIR, CorpusConfig, ScoreCorpusConfig, load_config
from gradood.data import listing, sources
from gradood.data.base import DEFAULT_MAX_BYTES, CorpusSource, RawRow, Shard
from gradood.data.images import DEFAULT_MAX_PIXELS, ImageConverter, ImageDecodeError, decode_image
from gradood.data.sources import load_all, load_rows, open_source

RGB8 = ImageConverter("RGB", (8, 8))
MAX_BYTES = 4096  # the zoo's byte limit: every image is far smaller, the oversized file is not
DECODED, ERROR, SKIPPED = "decoded", "error", "skipped"


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def grey_as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` greyscale pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def pillow_reference(raw: bytes) -> np.ndarray:
    """Lossy formats: the reference is Pillow's own decode of the very same bytes."""
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def files_on_disk(root: Path) -> int:
    """Every non-directory entry, plus directory symlinks (not followed: they may be cycles)."""
    total = 0
    for folder, dirs, files in os.walk(root):
        total += len(files) + sum(os.path.islink(os.path.join(folder, d)) for d in dirs)
    return total


@pytest.fixture
def folder_zoo(tmp_path, monkeypatch) -> tuple[Path, dict[str, tuple[str, object]]]:
    """The root and, per relative path, (outcome, expected RGB pixels | reason pattern)."""
    root = tmp_path / "zoo"
    zoo: dict[str, tuple[str, object]] = {}

    def put(name: str, raw: bytes, outcome: str, expected: object) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        zoo[name] = (outcome, expected)

    def image(name: str, pixels: np.ndarray, fmt: str, expected: np.ndarray | None = None, **kwargs) -> bytes:
        raw = encode(Image.fromarray(pixels), fmt, **kwargs)
        put(name, raw, DECODED, pixels if expected is None else expected)
        return raw

    # decoded, lossless: the exact pixels written
    image("png/rgb.png", rgb(0), "PNG")
    image("bmp/rgb.bmp", rgb(1), "BMP")
    image("webp/lossless.webp", rgb(2), "WEBP", lossless=True)
    image("tiff/rgb.tif", rgb(3), "TIFF")
    image("UPPER.PNG", rgb(4), "PNG")
    image("deep/a/b/c/nested.png", rgb(5), "PNG")
    frames = [Image.fromarray(np.full((8, 8), value, np.uint8)) for value in (40, 200, 120)]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    put("gif/animated.gif", animated, DECODED, grey_as_rgb(np.full((8, 8), 40, np.uint8)))  # frame 0
    pages = [Image.fromarray(rgb(10 + i)) for i in range(3)]
    put("tiff/pages.tiff", encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), DECODED, rgb(10))
    wide = np.random.default_rng(6).integers(0, 65536, (8, 8), dtype=np.uint16)
    image("png/sixteen.png", wide, "PNG", grey_as_rgb((wide >> 8).astype(np.uint8)))
    image("tiff/sixteen.tif", wide, "TIFF", grey_as_rgb((wide >> 8).astype(np.uint8)))
    floats = np.linspace(-0.5, 1.5, 64, dtype=np.float32).reshape(8, 8)
    image(
        "tiff/float.tif",
        floats,
        "TIFF",
        grey_as_rgb(np.round(floats.astype(float).clip(0, 1) * 255).astype(np.uint8)),
    )
    palette = np.random.default_rng(7).integers(0, 256, (256, 3), dtype=np.uint8)
    index = np.random.default_rng(8).integers(0, 256, (8, 8), dtype=np.uint8)
    indexed = Image.frombytes("P", (8, 8), index.tobytes())
    indexed.putpalette(palette.tobytes())
    put("png/palette.png", encode(indexed, "PNG"), DECODED, palette[index])
    put("tiff/palette.tif", encode(indexed, "TIFF"), DECODED, palette[index])
    rgba = np.random.default_rng(9).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(8) % 2 == 0, 0, 255)  # alternate transparent and opaque columns
    image("png/rgba.png", rgba, "PNG", np.where(rgba[..., 3:] == 255, rgba[..., :3], 0).astype(np.uint8))
    # decoded, lossy: Pillow's decode of the same bytes
    for name, raw in [
        ("jpeg/photo.jpg", encode(Image.fromarray(rgb(11)), "JPEG")),
        ("jpeg/photo.JPEG", encode(Image.fromarray(rgb(12)), "JPEG")),
        ("jpeg/cmyk.jpg", encode(Image.fromarray(rgb(13)).convert("CMYK"), "JPEG")),
        ("webp/lossy.webp", encode(Image.fromarray(rgb(14)), "WEBP")),
    ]:
        put(name, raw, DECODED, pillow_reference(raw))
    # a valid symlink is an input under its own path
    (root / "link-to-rgb.png").symlink_to("png/rgb.png")
    zoo["link-to-rgb.png"] = (DECODED, rgb(0))

    # error rows: an image extension promises an image
    put(
        "bad/truncated.png", encode(Image.fromarray(rgb(20, 64)), "PNG")[:600], ERROR, r"^cannot decode image"
    )
    jpeg = encode(Image.fromarray(rgb(21, 64)), "JPEG")
    put("bad/truncated.jpg", jpeg[: len(jpeg) // 2], ERROR, r"^cannot decode image: image file is truncated")
    put("bad/empty.png", b"", ERROR, r"^empty file$")
    put(
        "bad/text.png",
        b"just some notes, renamed\n" * 4,
        ERROR,
        r"^not a recognised image format \(100 bytes\)",
    )
    put(
        "bad/page.jpg",
        b"<!doctype html><html><body>404</body></html>",
        ERROR,
        r"^not a recognised image format",
    )
    put("bad/zero-width.png", png_claiming(0, 5), ERROR, r"^not a recognised image format")
    put(
        "bad/bomb-8000.png",
        png_claiming(8000, 8000),
        ERROR,
        r"^image too large: 8000x8000 = 64000000 pixels, over max_pixels=50000000$",
    )
    put("bad/bomb-10000.png", png_claiming(10000, 10000), ERROR, r"^image too large: .*100000000 pixels")
    put("bad/bomb-30000.png", png_claiming(30000, 30000), ERROR, r"^image too large: .*900000000 pixels")
    oversized = encode(Image.fromarray(rgb(22, 40)), "BMP")
    put(
        "bad/oversized.bmp",
        oversized,
        ERROR,
        rf"^file is {len(oversized)} bytes, over max_bytes={MAX_BYTES}$",
    )
    nan = np.full((8, 8), np.nan, np.float32)
    put("bad/nan.tif", encode(Image.fromarray(nan), "TIFF"), ERROR, r"^cannot convert image: .*NaN")
    put("bad/garbage.gif", b"GIF89a" + bytes(range(256)), ERROR, r"^not a recognised image format")

    # skipped: not inputs
    put(".hidden.png", encode(Image.fromarray(rgb(30)), "PNG"), SKIPPED, listing.HIDDEN_FILE)
    put(".DS_Store", b"\x00\x00\x00\x01Bud1", SKIPPED, listing.HIDDEN_FILE)
    put("png/._rgb.png", b"\x00\x05\x16\x07", SKIPPED, listing.HIDDEN_FILE)
    put(".cache/inside.png", encode(Image.fromarray(rgb(31)), "PNG"), SKIPPED, listing.IN_HIDDEN_FOLDER)
    put(".cache/deeper/inside.jpg", b"", SKIPPED, listing.IN_HIDDEN_FOLDER)
    other = sources.FolderSource.skip_reason
    put("notes.txt", b"notes", SKIPPED, other)
    put("meta/labels.json", b"{}", SKIPPED, other)
    put("README", b"readme", SKIPPED, other)
    put("tiff/thumbs.db", b"\x00", SKIPPED, other)
    for name, target, reason in [
        ("broken.png", "missing.png", listing.BROKEN_SYMLINK),
        ("loop-a.png", "loop-b.png", listing.SYMLINK_LOOP),
        ("loop-b.png", "loop-a.png", listing.SYMLINK_LOOP),
        ("self.png", "self.png", listing.SYMLINK_LOOP),
        ("deep/a/cycle", "../..", listing.SYMLINK_LOOP),  # a directory symlink to an ancestor
        (".cache/broken.png", "nowhere.png", listing.IN_HIDDEN_FOLDER),
    ]:
        (root / name).symlink_to(target)
        zoo[name] = (SKIPPED, reason)
    os.mkfifo(root / "fifo.png")
    zoo["fifo.png"] = (SKIPPED, listing.NOT_REGULAR)
    monkeypatch.chdir(root)  # a relative name keeps the socket path under the 108-byte limit
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("socket.png")
    zoo["socket.png"] = (SKIPPED, listing.NOT_REGULAR)
    return root, dict(sorted(zoo.items()))


def test_every_file_of_a_folder_is_accounted_for(folder_zoo):
    root, zoo = folder_zoo
    assert len({outcome for outcome, _ in zoo.values()}) == 3 and len(zoo) >= 20
    inputs = [str(root / name) for name, (outcome, _) in zoo.items() if outcome != SKIPPED]
    expected = {str(root / name): value for name, value in zoo.items()}
    source = open_source(str(root), max_bytes=MAX_BYTES)
    assert source.num_rows() == len(inputs)

    loaded = load_all(source, RGB8)
    decoded = [path for path in inputs if expected[path][0] == DECODED]
    assert loaded.ids == decoded
    assert loaded.row_index.tolist() == [inputs.index(path) for path in decoded]
    for path, image in zip(loaded.ids, loaded.images, strict=True):
        np.testing.assert_array_equal(image.transpose(1, 2, 0), expected[path][1], err_msg=path)
    assert [(path, index) for path, index, _ in loaded.errors] == [
        (path, index) for index, path in enumerate(inputs) if expected[path][0] == ERROR
    ]
    for path, _, reason in loaded.errors:
        assert re.search(expected[path][1], reason), (path, reason)

    skipped = Counter(reason for outcome, reason in zoo.values() if outcome == SKIPPED)
    assert source.skipped() == dict(skipped)
    assert source.describe()["skipped_files"] == dict(skipped)
    assert len(loaded.ids) + len(loaded.errors) == source.num_rows()
    assert source.num_rows() + sum(source.skipped().values()) == files_on_disk(root) == len(zoo)

    # any sharding gives the same rows
    rows = [load_rows(source, shard, RGB8) for shard in source.shards(5)]
    assert [i for r in rows for i in r.ids] == loaded.ids
    assert [e for r in rows for e in r.errors] == loaded.errors


def test_listing_is_a_single_pass(folder_zoo, monkeypatch):
    root, _ = folder_zoo
    calls = []
    real = sources.list_files
    monkeypatch.setattr(sources, "list_files", lambda uri: calls.append(uri) or real(uri))
    source = open_source(str(root))
    source.describe(), source.shards(7), source.skipped(), load_all(source, RGB8)
    assert calls == [str(root)]


def test_pyarrow_listing_agrees_where_it_can(tmp_path):
    """Object stores take pyarrow's listing; on a tree without broken links it sees what the walker sees."""
    root = tmp_path / "tree"
    (root / "a" / ".hid").mkdir(parents=True)
    for name in ("x.png", "a/y.txt", "a/.hid/z.png", ".top.png"):
        (root / name).write_bytes(b"x")
    (root / "a" / "link.png").symlink_to("../x.png")
    os.mkfifo(root / "a" / "fifo")
    local = sorted(listing._local_entries(str(root)))
    assert sorted(listing._remote_entries(pafs.LocalFileSystem(), str(root))) == local
    assert {path: problem for path, problem, _, _ in local}[str(root / "a" / "fifo")] == listing.NOT_REGULAR


def test_unreadable_folder_is_counted(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "a.png").write_bytes(encode(Image.fromarray(rgb(0)), "PNG"))
    (root / "b.png").write_bytes(encode(Image.fromarray(rgb(1)), "PNG"))
    real = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    source = open_source(str(root))
    assert source.num_rows() == 1 and source.skipped() == {listing.UNREADABLE: 1}


def write_parquet(path: Path, payloads: list, row_group_size: int = 3) -> Path:
    pq.write_table(pa.table({"image": pa.array(payloads, pa.binary())}), path, row_group_size=row_group_size)
    return path


def test_parquet_zoo(tmp_path):
    """Good rows, bad cells, and bad files among good ones: every file and row is accounted for."""
    root = tmp_path / "lake"
    root.mkdir()
    good_png, good_jpeg = encode(Image.fromarray(rgb(40)), "PNG"), encode(Image.fromarray(rgb(41)), "JPEG")
    cells = [
        (good_png, rgb(40)),
        (None, r"^null in column 'image'$"),
        (b"", r"^empty file$"),
        (b"\x00" * 64, r"^not a recognised image format \(64 bytes\)$"),
        (bytes(range(256)) * 2, r"^not a recognised image format"),
        (b"\x01" * (MAX_BYTES + 1), rf"^row is {MAX_BYTES + 1} bytes, over max_bytes={MAX_BYTES}$"),
        (png_claiming(30000, 30000), r"^image too large"),
        (good_jpeg, pillow_reference(good_jpeg)),
    ]
    good = write_parquet(root / "a-good.parquet", [payload for payload, _ in cells])
    raw = good.read_bytes()
    broken = {
        "b-truncated.parquet": (
            raw[: len(raw) // 2],
            r"^cannot read Parquet footer: .*magic bytes not found",
        ),
        "c-not-parquet.parquet": (good_png, r"^cannot read Parquet footer: .*magic bytes not found"),
        "d-empty.parquet": (b"", r"^cannot read Parquet footer: .*0 bytes"),
        "e-bad-footer.parquet": (
            b"PAR1" + b"\xff" * 32 + struct.pack("<I", 32) + b"PAR1",
            r"^cannot read Parquet footer",
        ),
    }
    for name, (content, _) in broken.items():
        (root / name).write_bytes(content)
    mid = write_parquet(root / "f-mid.parquet", [good_png] * 9)
    offset = pq.ParquetFile(mid).metadata.row_group(1).column(0).data_page_offset
    damaged = bytearray(mid.read_bytes())
    damaged[offset : offset + 16] = b"\xff" * 16  # the second row group's page header
    mid.write_bytes(bytes(damaged))
    (root / "_SUCCESS").write_bytes(b"")
    (root / ".a-good.parquet.crc").write_bytes(b"crc")

    source = open_source(str(root), max_bytes=MAX_BYTES)
    # an unreadable file takes one row of the order; the others keep their ids and indices
    expected: list[tuple[str, object]] = [(f"{good}#{i}", value) for i, (_, value) in enumerate(cells)]
    expected += [(str(root / name), pattern) for name, (_, pattern) in broken.items()]
    expected += [
        (f"{mid}#{i}", rgb(40) if i // 3 != 1 else r"^cannot read Parquet row group 1") for i in range(9)
    ]
    assert source.num_rows() == len(expected) == 21
    described = source.describe()
    assert (described["files"], described["unreadable_files"]) == (6, 4)
    assert source.skipped() == {listing.HIDDEN_FILE: 1, sources.ParquetSource.skip_reason: 1}
    assert described["files"] + sum(source.skipped().values()) == files_on_disk(root) == 8

    for shard_size in (1, 4, 100):
        ids, errors, images = [], [], []
        for shard in source.shards(shard_size):
            rows = load_rows(source, shard, RGB8)
            ids += rows.ids
            errors += rows.errors
            images += list(rows.images)
        assert len(ids) + len(errors) == source.num_rows()
        assert ids == [row_id for row_id, value in expected if isinstance(value, np.ndarray)]
        for row_id, image in zip(ids, images, strict=True):
            np.testing.assert_array_equal(image.transpose(1, 2, 0), dict(expected)[row_id], err_msg=row_id)
        assert [(row_id, index) for row_id, index, _ in errors] == [
            (row_id, index) for index, (row_id, value) in enumerate(expected) if isinstance(value, str)
        ]
        for row_id, _, reason in errors:
            assert re.search(dict(expected)[row_id], reason), (row_id, reason)
    alone = load_all(open_source(str(good), max_bytes=MAX_BYTES), RGB8)
    assert alone.ids == ids[: len(alone.ids)] and alone.errors == errors[: len(alone.errors)]


def test_parquet_without_a_readable_file(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"none of its 2 Parquet files is readable \(.*a.parquet: .*0 bytes"):
        open_source(str(tmp_path))


def test_limits_are_configurable(tmp_path):
    raw = encode(Image.fromarray(rgb(0)), "PNG")
    (tmp_path / "a.png").write_bytes(raw)

    def outcome(**limits) -> str:
        loaded = load_all(open_source(str(tmp_path), **limits), RGB8)
        return loaded.errors[0][2] if loaded.errors else DECODED

    assert outcome() == DECODED
    assert outcome(max_pixels=64, max_bytes=len(raw)) == DECODED
    assert outcome(max_pixels=63) == "image too large: 8x8 = 64 pixels, over max_pixels=63"
    assert outcome(max_bytes=len(raw) - 1) == f"file is {len(raw)} bytes, over max_bytes={len(raw) - 1}"
    assert outcome(max_pixels=None, max_bytes=None) == DECODED
    described = open_source(str(tmp_path), max_pixels=123, max_bytes=None).describe()
    assert (described["max_pixels"], described["max_bytes"]) == (123, None)
    for bad in ({"max_pixels": 0}, {"max_bytes": -1}):
        with pytest.raises(ValueError, match="must be positive"):
            open_source(str(tmp_path), **bad)
    source = open_source("torchvision://FashionMNIST?split=test", max_pixels=5)
    assert source.max_pixels == 5 and source.skipped() == {}


def test_defaults_match_the_config():
    assert (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES) == (50_000_000, 64 * 2**20)
    assert (CorpusConfig().max_pixels, CorpusConfig().max_bytes) == (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)
    yaml = [CONF_DIR / "score_corpus.yaml"]
    cfg = load_config(ScoreCorpusConfig, yaml, [])
    assert (cfg.corpus.max_pixels, cfg.corpus.max_bytes) == (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)
    cfg = load_config(ScoreCorpusConfig, yaml, ["corpus.max_pixels=null", "corpus.max_bytes=1000"])
    assert (cfg.corpus.max_pixels, cfg.corpus.max_bytes) == (None, 1000)


def test_pillow_bomb_guard_is_an_error_never_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for size in (10000, 30000):
            with pytest.raises(ImageDecodeError, match="image too large: Image size"):
                decode_image(png_claiming(size, size), max_pixels=None)
    assert caught == []


class _Rows(CorpusSource):
    """Rows given as they are: the decoded-image payloads an in-memory dataset hands over."""

    def __init__(self, payloads: list, **limits):
        super().__init__("memory://", **limits)
        self.payloads = payloads

    def total_rows(self) -> int:
        return len(self.payloads)

    def _locate(self, first_row: int, end_row: int) -> tuple:
        return (first_row, end_row)

    def read_shard(self, shard: Shard):
        for index in range(*shard.locator):
            yield RawRow(f"row-{index}", index, self.payloads[index])


def test_decoded_payloads_are_held_to_the_pixel_limit():
    source = _Rows(
        [Image.new("RGB", (0, 4)), Image.new("RGB", (9, 9)), Image.new("RGB", (8, 8))], max_pixels=64
    )
    loaded = load_all(source, RGB8)
    assert loaded.ids == ["row-2"]
    assert [reason for _, _, reason in loaded.errors] == [
        "image has no pixels (0x4)",
        "image too large: 9x9 = 81 pixels, over max_pixels=64",
    ]


def _rows(source: CorpusSource, shard_size: int) -> list[tuple]:
    return [
        (row.id, row.row_index, row.payload, row.error)
        for shard in source.shards(shard_size)
        for row in source.read_shard(shard)
    ]


def test_listing_in_ray_tasks_is_the_in_memory_listing(folder_zoo, local_ray, tmp_path):
    """Parts listed by tasks give the same rows, ids, indices, skipped counts and inputs as one pass."""
    from gradood.core import storage
    from gradood.pipeline.plan import stage_listing
    from gradood.pipeline.publish import new_or_changed, read_seen

    root, _ = folder_zoo
    # names whose files sort across folder boundaries: "a b/z" < "a-b/y" < "a.png" < "a/x" < "a0.png"
    for name in ("a.png", "a0.png", "a/x.png", "a-b/y.png", "a b/z.png", "zz/.hid/q.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode(Image.fromarray(rgb(len(name))), "PNG"))
    (root / "loop-dir").symlink_to(".")  # a top-level folder link back to the root
    (root / "one" / "two").mkdir(parents=True)
    (root / "one" / "two" / "x.png").write_bytes(encode(Image.fromarray(rgb(3)), "PNG"))
    (root / "one" / "two" / "back").symlink_to("..")  # a link to an ancestor below the root
    (root / "one" / "top.png").write_bytes(encode(Image.fromarray(rgb(4)), "PNG"))
    reference = open_source(str(root), max_bytes=MAX_BYTES)
    staged = stage_listing(str(root), str(tmp_path / "parts"), [], max_bytes=MAX_BYTES)
    source = staged.source
    assert staged.listed == staged.kept == reference.num_rows() == source.num_rows()
    # a small tree is listed a level at a time: one/'s own file and one/two/ land in separate parts
    paths = [storage.read_parquet(p.uri, ["path"]).column("path").to_pylist() for p in source.parts]
    assert [str(root / "one" / "top.png")] in paths and [str(root / "one" / "two" / "x.png")] in paths
    assert source.skipped() == reference.skipped()
    assert source.skipped()[listing.SYMLINK_LOOP] == 6 and source.skipped()[listing.IN_HIDDEN_FOLDER] == 4
    expected = _rows(reference, 1000)
    assert [r[0] for r in expected] == sorted(r[0] for r in expected)
    for shard_size in (1, 3, 1000):
        assert _rows(source, shard_size) == expected
    assert source.input_files().equals(reference.input_files())

    # an incremental night: files a published manifest lists with the same size and mtime are left out
    inputs = reference.input_files()
    seen_rows = inputs.take([0, 3, 4, 9, len(inputs) - 1])
    changed = seen_rows.take([1]).set_column(1, "size", pa.array([1], pa.int64()))  # listed, since changed
    manifest = tmp_path / "manifest" / "run_id=night1"
    manifest.mkdir(parents=True)
    pq.write_table(pa.concat_tables([seen_rows.take([0, 2, 3, 4]), changed]), manifest / "part-0.parquet")
    assert read_seen([str(manifest)], (inputs["uri"][2].as_py(), inputs["uri"][4].as_py())).num_rows == 2
    (tmp_path / "manifest" / "run_id=nothing-new").mkdir()  # a night that scored nothing wrote no part
    assert read_seen([str(tmp_path / "manifest" / "run_id=nothing-new")]).num_rows == 0
    night = stage_listing(str(root), str(tmp_path / "parts2"), [str(manifest)], max_bytes=MAX_BYTES)
    new = new_or_changed(inputs, read_seen([str(manifest)]))
    assert night.listed == len(inputs) and night.kept == new.num_rows == len(inputs) - 4
    assert night.source.input_files().equals(new)
    kept = set(new.column("uri").to_pylist())
    assert [r[0] for r in _rows(night.source, 4)] == [r[0] for r in expected if r[0] in kept]
