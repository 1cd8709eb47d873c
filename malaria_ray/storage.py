"""URIs -> filesystems: local paths, ``file://`` and ``s3://`` (any S3-compatible store).

Object-store settings come from the standard AWS environment, the way users' other tools are
configured: the credentials chain (env vars, profile, instance/pod role) and ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``) for S3-compatible stores. Nothing here reads credentials from files
in the repo or writes them anywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import posixpath
from typing import Any, Iterator

import fsspec


class StorageError(RuntimeError):
    """A URI that cannot be read or written; the message is shown to the user as is."""


def s3_options() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict[str, Any] = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


# Settings a Ray worker needs to read the same URIs as the driver; passed through runtime_env
# because workers of a Ray started earlier (a long-lived local Ray, a test session) never saw them.
# Never credentials: Ray writes runtime envs into its logs and the dashboard, so keys reach
# workers only through the nodes' own environment or instance roles.
WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """This process's environment with ``values`` set while the block runs, then each variable as it
    was (unset again where it was unset)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_env(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The part of this process's environment that Ray tasks and actors must share."""
    return {k: os.environ[k] for k in (*WORKER_ENV, *extra) if k in os.environ}


_SECRET_PARTS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@|\?[^\s#'\"]*", re.IGNORECASE)


def redact(text: str | None) -> str | None:
    """``text`` with URI credentials (``user:pass@``) and query strings (presigned-URL signatures,
    tokens) removed: what may appear in config.json, manifests, error rows and logs."""
    if not text:
        return text
    return _SECRET_PARTS.sub(lambda m: (m.group("scheme") + "<redacted>@") if m.group("scheme") else "?<redacted>",
                             text)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


S3, S3A = "s3://", "s3a://"  # s3a:// (Hadoop's name for the same buckets) is read as s3://


def is_s3(uri: str) -> bool:
    return uri.startswith((S3, S3A))


def canonical(uri: str) -> str:
    """``uri`` with an ``s3a://`` scheme written ``s3://``: one spelling per object."""
    return S3 + uri[len(S3A):] if uri.startswith(S3A) else uri


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (no protocol)."""
    if is_s3(uri):
        fs, path = fsspec.core.url_to_fs(canonical(uri), **s3_options())
    else:
        fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def forget_listings(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop the cached listings of ``path``, its parents and every folder beneath it: other processes
    write there. fsspec's ``invalidate_cache`` forgets a path and its parents only, and s3fs answers
    ``open`` of a file from its folder's cached listing: a part another process published into a
    partition this process had listed was then "not found" although a fresh listing named it."""
    fs.invalidate_cache(path)
    cache = getattr(fs, "dircache", None)
    if cache:
        below = path.rstrip("/") + "/"
        for key in [k for k in list(cache) if k.startswith(below)]:
            cache.pop(key, None)


def read_filesystem(uri: str, timeout_s: float) -> tuple[fsspec.AbstractFileSystem, str]:
    """``filesystem`` for reading inputs under a time limit: on S3 the client waits at most
    ``timeout_s`` to connect and for each answer, and neither botocore nor s3fs retries on its own,
    so the caller's bounded retries (``reads.ReadPolicy``) are the only ones and a stalled GET ends.
    Elsewhere the plain filesystem (``reads`` bounds local reads itself)."""
    if not is_s3(uri):
        return filesystem(uri)
    config = {"connect_timeout": timeout_s, "read_timeout": timeout_s,
              "retries": {"mode": "standard", "total_max_attempts": 1}}
    fs, path = fsspec.core.url_to_fs(canonical(uri), **s3_options(), config_kwargs=config)
    fs.retries = 1  # s3fs's own loop (a class default of 5): this instance is for bounded reads only
    return fs, path


def protocol_prefix(uri: str) -> str:
    """``s3://`` for object-store URIs, ``""`` for local paths (``file://`` is stripped)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.split("://", 1)[0] + "://"
    return ""


def local_path(uri: str) -> str:
    """The local path of a local URI (``file://`` stripped); call only where ``not is_remote(uri)``."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(local_path(uri), *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """The whole object: one GET on S3 (``open().read()`` costs a HEAD first)."""
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: dict) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str))


# Every Parquet file the project writes: one codec (zstd: smaller than snappy at a similar read
# speed, and read by pandas, pyarrow, DuckDB and Spark alike) and the version of the project's
# Parquet columns in the file's key-value metadata, so that a reader meeting a file of another
# version can say so. Raise the version when a column is renamed, retyped or dropped.
PARQUET_CODEC = "zstd"
SCHEMA_VERSION_KEY = b"malaria_ray.schema_version"
SCHEMA_VERSION = 1  # files without the key were written before versions were recorded: "0"


def versioned(schema):
    """``schema`` (a pyarrow schema) with the project's schema version in its metadata."""
    return schema.with_metadata({**(schema.metadata or {}), SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


def parquet_writer(sink, schema):
    """A ``pyarrow.parquet.ParquetWriter`` on ``sink`` (a path or an open binary file): the
    project's codec and schema version."""
    import pyarrow.parquet as pq

    return pq.ParquetWriter(sink, versioned(schema), compression=PARQUET_CODEC)


def table_bytes(table) -> bytes:
    """A pyarrow table as the bytes of one Parquet file (the project's codec and schema version)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(versioned(table.schema).metadata), buf, compression=PARQUET_CODEC)
    return buf.getvalue()


def schema_version(schema) -> str:
    """The project's schema version a Parquet file's (arrow) schema records; "0" when none."""
    return ((schema.metadata or {}).get(SCHEMA_VERSION_KEY) or b"0").decode()


def require_columns(schema, needed, uri: str, what: str = "file") -> None:
    """Raise ``StorageError`` naming ``uri`` and the columns of ``needed`` that ``schema`` (a Parquet
    file's arrow schema) lacks: a reader says what is missing instead of skipping the file."""
    missing = [c for c in dict.fromkeys(needed) if c not in schema.names]
    if missing:
        raise StorageError(f"{uri} lacks column(s) {', '.join(missing)} (schema version {schema_version(schema)}; "
                           f"this version writes {SCHEMA_VERSION}): not a {what} of this version")


def replace_file(uri: str, data: bytes) -> None:
    """Replace ``uri`` in one step: rename locally, a single PUT (whole object) on S3."""
    if is_remote(uri):
        write_bytes(uri, data)
        return
    path = local_path(uri)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def upload_file(local_path: str, uri: str) -> None:
    with open(local_path, "rb") as f:
        write_bytes(uri, f.read())


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (a local path or an object-store prefix)."""
    for root, _dirs, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            upload_file(src, join(uri, *rel.split("/")))


def check_writable(uri: str) -> None:
    """Fail early, with the reason, when ``uri`` cannot take outputs.

    Never creates a missing bucket (fsspec's makedirs would): a job must not invent buckets.
    """
    if is_s3(uri):
        fs, path = filesystem(uri)
        bucket = path.split("/", 1)[0]
        try:
            found = fs.exists(bucket)
        except Exception as exc:  # denied, bad endpoint: the backend's type varies
            raise StorageError(f"output {uri}: cannot reach bucket {bucket}: {type(exc).__name__}: {exc}") from exc
        if not found:
            raise StorageError(f"output {uri} is not writable: bucket {bucket} does not exist")
    probe = join(uri, ".malaria-ray-write-probe")
    try:
        write_bytes(probe, b"ok")
        fs, path = filesystem(probe)
        fs.rm(path)
    except Exception as exc:  # the backend's own error type varies (OSError, botocore, PermissionError)
        raise StorageError(f"output {uri} is not writable: {type(exc).__name__}: {exc}") from exc
