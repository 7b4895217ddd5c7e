"""Output locations: local paths and pyarrow-filesystem URIs (s3://, gs://, file://) through one code path.

URIs are resolved by ``pyarrow.fs.FileSystem.from_uri``, so an object store is configured the way
pyarrow and the AWS SDK are: credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or a
profile, or the instance role), the region from ``AWS_DEFAULT_REGION``, and an S3-compatible endpoint
(MinIO, Ceph, a local test server) from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, which pyarrow
reads itself. Ray workers inherit the driver's environment on an embedded Ray; on a cluster, set the
same variables on every node (or in the job's ``runtime_env``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "file://", "abfs://", "abfss://")


def is_uri(location: str) -> bool:
    return location.startswith(_URI_SCHEMES)


def absolute(location: str) -> str:
    """Local paths become absolute (Ray workers may run elsewhere in the tree); URIs stay as they are."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


#: attempts of every S3 request before it fails (the environment variable GRADOOD_S3_MAX_ATTEMPTS sets
#: it, on every node): throttling (503 SlowDown), timeouts and server errors are retried with the AWS
#: SDK's exponential backoff and jitter, where pyarrow's default gives up after 3
S3_MAX_ATTEMPTS = 10


def s3_max_attempts() -> int:
    value = os.environ.get("GRADOOD_S3_MAX_ATTEMPTS", str(S3_MAX_ATTEMPTS))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"GRADOOD_S3_MAX_ATTEMPTS must be a positive integer, got {value!r}")
    return int(value)


def from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem and path for a URI; an S3 bucket's with :func:`s3_max_attempts` attempts per
    request (a URI with a query string keeps pyarrow's options, and their retry default)."""
    fs, path = pafs.FileSystem.from_uri(uri)
    if fs.type_name == "s3" and "?" not in uri:
        fs = pafs.S3FileSystem(
            region=fs.region,
            endpoint_override=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s3_max_attempts()),
        )
    return fs, path


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return from_uri(location)
    return pafs.LocalFileSystem(), absolute(location)


def _object_store(fs: pafs.FileSystem) -> bool:
    """Object stores: keys, no directories to create, and every object written atomically."""
    return fs.type_name in ("s3", "gcs")


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(location: str) -> None:
    """Create a folder and its parents; on an object store nothing (a prefix needs no marker object)."""
    fs, path = filesystem(location)
    if not _object_store(fs):
        fs.create_dir(path, recursive=True)


def delete_dir_contents(location: str) -> None:
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)


def delete_dir(location: str) -> None:
    """Remove a folder and everything under it; nothing happens when there is none."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def delete_file(location: str) -> None:
    fs, path = filesystem(location)
    fs.delete_file(path)


def list_files(location: str, suffix: str = ".parquet") -> list[str]:
    """Files under a folder, sorted, as locations of the same kind (URI or local path)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    if is_uri(location):
        scheme = location.split("://", 1)[0]
        return [f"{scheme}://{p}" for p in found]
    return found


def write_bytes(location: str, data: bytes) -> None:
    """Write via a temporary name and a move where there is one, so readers never see half a file."""
    fs, path = filesystem(location)
    if not _object_store(fs):  # on an object store a key needs no parent, and a marker object costs calls
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:  # object stores write objects atomically
        with fs.open_output_stream(path) as out:
            out.write(data)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_json(location: str, obj: Any) -> None:
    write_text(location, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(location: str) -> Any:
    return json.loads(read_text(location))


def write_parquet(table: pa.Table, location: str, row_group_size: int | None = None) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    write_bytes(location, sink.getvalue().to_pybytes())


def read_parquet(location: str, columns: list[str] | None = None) -> pa.Table:
    """One file or a folder of Parquet files (sorted), concatenated."""
    fs, path = filesystem(location)
    files = [location] if fs.get_file_info(path).type == pafs.FileType.File else list_files(location)
    tables = []
    for f in files:
        ffs, fpath = filesystem(f)
        tables.append(pq.read_table(fpath, filesystem=ffs, columns=columns))
    if not tables:
        raise FileNotFoundError(f"no Parquet files under {location}")
    return pa.concat_tables(tables, promote_options="permissive")


def parquet_rows(files: list[str]) -> int:
    """Rows of Parquet files, from their footers."""
    total = 0
    for f in files:
        fs, path = filesystem(f)
        with fs.open_input_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total
