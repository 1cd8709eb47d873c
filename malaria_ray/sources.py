"""Scoring inputs: list what is under an input URI and stream one row per image out of it.

An input is a local path, ``file://`` or ``s3://`` URI naming one file or a folder/prefix tree of
any depth holding, mixed: loose images (.png/.jpg/.jpeg/.tif/.tiff), tar shards (.tar, .tar.gz,
.tgz), zip archives (NIH publishes the corpus as one zip) and Parquet files with an image-bytes
column. The driver lists *paths* only (``list_units``); the bytes are read inside Ray Data tasks
by ``expand_unit``, one archive member or Parquet row at a time, so no process holds an archive.

Every row ``expand_unit`` yields has a ``status`` (``malaria_ray.schema``): ``ok`` (bytes to
score), ``error`` (an input that exists but could not be read; it becomes an error row),
``non_image`` (skipped and counted) or ``empty_archive`` (counted). Training and scoring read
through these same functions. Pure: imports neither Ray nor TensorFlow.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import zipfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from malaria_ray import storage
from malaria_ray.config import CorpusError
from malaria_ray.schema import (
    COL_DATA, COL_ERROR, COL_KIND, COL_LABEL, COL_LABEL_HINT, COL_PATIENT, COL_PATIENT_HINT, COL_SLIDE, COL_SLIDE_HINT,
    COL_SOURCE_VERSION, COL_STATUS, COL_URI, COL_VERSION, IMAGE_SUFFIXES, KIND_IMAGE, KIND_PARQUET, KIND_TAR,
    KIND_ZIP, PARQUET_SUFFIXES, STATUS_DUPLICATE, STATUS_EMPTY, STATUS_ERROR, STATUS_HIDDEN, STATUS_NON_IMAGE,
    STATUS_OK, TAR_SUFFIXES, ZIP_SUFFIXES, member_uri,
)

# Unit kinds (``schema.KIND_*``, suffixes ``schema.*_SUFFIXES``): what the driver lists.
KIND_BAD_NAME = "bad_name"  # a file whose name is not valid UTF-8: listed so that it becomes an error row
UNIT_KINDS = (KIND_IMAGE, KIND_TAR, KIND_ZIP, KIND_PARQUET, KIND_BAD_NAME)

# Parquet inputs: the first column found by these names (or the only binary column) holds bytes.
PARQUET_BYTES_NAMES = ("image", "image_bytes", "bytes", "data", "content", "png")
PARQUET_PATH_NAMES = ("uri", "path", "filename", "file_name", "name")
PARQUET_BATCH_ROWS = 256


@dataclass(frozen=True)
class Limits:
    """Caps checked on an archive member's header before any of its bytes are read: over either
    is an error row, never an out-of-memory kill (a zip bomb declares a small packed size)."""

    member_bytes: int = 64 * 2**20  # --max-member-mb
    compression_ratio: float = 100.0  # --max-compression-ratio (zip members: unpacked / packed)


DEFAULT_LIMITS = Limits()


@dataclass
class Units:
    """What the driver found under an input: units to read, and loose files it skipped.

    The units live in one Arrow table (``kind``, ``uri``), which Ray Data reads as is
    (``ray.data.from_arrow``); docs/benchmarks.md has what it costs per unit.
    """

    table: pa.Table = field(default_factory=lambda: pa.table({COL_KIND: pa.array([], pa.string()),
                                                              COL_URI: pa.array([], pa.string())}))
    skipped: list[str] = field(default_factory=list)  # non-image loose files (Thumbs.db, .txt, ...)

    def __len__(self) -> int:
        return self.table.num_rows

    def count(self, kind: str) -> int:
        return int(pc.sum(pc.equal(self.table.column(COL_KIND), kind)).as_py() or 0)


def kind_of(path: str) -> str | None:
    """The unit kind of a file name, or None for anything we do not read."""
    low = path.lower()
    for kind, suffixes in ((KIND_IMAGE, IMAGE_SUFFIXES), (KIND_TAR, TAR_SUFFIXES),
                           (KIND_ZIP, ZIP_SUFFIXES), (KIND_PARQUET, PARQUET_SUFFIXES)):
        if low.endswith(suffixes):
            return kind
    return None


HIDDEN_FOLDER_PREFIXES = (".", "_")  # staging folders, .git, macOS resource-fork folders


def _undecodable(name: str) -> bool:
    """A name decoded with surrogate escapes (the OS or tarfile met bytes that are not UTF-8)."""
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _printable(name: str) -> str:
    """``name`` with its undecodable bytes shown as ``\\xNN``: a string any table can hold."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _hidden(rel: str) -> bool:
    # Staging folders and dotfiles (.DS_Store, ._resource forks) are not part of an input.
    return any(part.startswith(HIDDEN_FOLDER_PREFIXES) for part in rel.split("/")[:-1])


def list_units(input_uri: str) -> Units:
    """Every readable unit under ``input_uri`` (sorted), and the non-image files it skipped.

    Raises ``CorpusError`` when the input is missing or unreadable (missing bucket, no access).
    Paths stream into Arrow chunks in sorted order, one directory (local) or one listing page
    (S3, 1,000 keys) at a time, so the driver never holds a per-file info dict (fsspec ``find``
    builds one, and keeps it in its listings cache).
    """
    fs, root = storage.filesystem(input_uri)
    prefix = storage.protocol_prefix(input_uri)
    skipped, chunks, kinds, uris, versions = [], [], [], [], []
    try:
        if fs.isfile(root):
            found, base = iter([(root, _version(fs.info(root)))]), posixpath.dirname(root)
        elif fs.isdir(root):
            base = root
            if storage.is_s3(input_uri):
                found = _list_s3(fs, root)
            elif storage.is_remote(input_uri):  # another fsspec store: its own find, cache dropped
                found = iter(sorted((p, None) for p in fs.find(root)))
                fs.invalidate_cache()
            else:
                found = _walk_sorted(root)
        else:
            raise CorpusError(f"input {input_uri} does not exist")
        for path, version in found:
            if _hidden(posixpath.relpath(path, base) if base else path):
                continue
            kind = KIND_BAD_NAME if _undecodable(path) else kind_of(path)
            if kind is None:
                skipped.append(prefix + path)
                continue
            kinds.append(kind)
            uris.append(prefix + (_printable(path) if kind == KIND_BAD_NAME else path))
            versions.append(version)
            if len(uris) == 4096:  # Python strings only for a chunk: Arrow keeps ~100 B a path
                chunks.append(_units_table(kinds, uris, versions))
                kinds, uris, versions = [], [], []
    except CorpusError:
        raise
    except Exception as exc:  # missing bucket, denied, bad endpoint: the backend's type varies
        raise CorpusError(f"cannot list input {input_uri}: {type(exc).__name__}: {exc}") from exc
    chunks.append(_units_table(kinds, uris, versions))
    return Units(pa.concat_tables(chunks), skipped)


def _units_table(kinds: list, uris: list, versions: list) -> pa.Table:
    return pa.table({COL_KIND: pa.array(kinds, pa.string()), COL_URI: pa.array(uris, pa.string()),
                     COL_VERSION: pa.array(versions, pa.string())})


def _version(info: dict) -> str | None:
    """``size:etag`` or ``size:mtime`` of an fsspec info dict: what changes when the bytes do."""
    tag = info.get("ETag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{tag}" if tag is not None else None


def _walk_sorted(folder: str) -> Iterator[tuple[str, str]]:
    """(path, ``size:mtime_ns``) of the files under a local ``folder``, in sorted order of their
    full paths, holding one directory's entries per level. A folder sorts as its name plus ``/``,
    exactly where ``sorted()`` of the full paths would put its files. Folders ``_hidden`` would
    drop are not entered."""
    with os.scandir(folder) as it:
        entries = sorted((e.name + "/" if e.is_dir() else e.name, e.path, e) for e in it)
    for key, path, entry in entries:
        if not key.endswith("/"):
            st = entry.stat()
            yield path, f"{st.st_size}:{st.st_mtime_ns}"
        elif not key.startswith(HIDDEN_FOLDER_PREFIXES):
            yield from _walk_sorted(path)


def _list_s3(fs, root: str, page_size: int = 1000) -> Iterator[tuple[str, str]]:
    """Every object under the S3 prefix ``root`` ("bucket/key/prefix") as ("bucket/key", ``size:etag``), one
    ``ListObjectsV2`` page at a time (each page retried by s3fs). S3 returns keys in UTF-8 byte
    order, which is Python's ``sorted`` order of the full paths, so nothing is held to sort.
    Folder markers (keys ending in ``/``) are not objects to read."""
    bucket, key, _ = fs.split_path(root)
    request = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/" if key else "", "MaxKeys": page_size,
               **fs.req_kw}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        for obj in page.get("Contents", ()):
            if not obj["Key"].endswith("/"):
                yield f"{bucket}/{obj['Key']}", f"{obj['Size']}:{obj['ETag']}"
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def rows_to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows from ``expand_unit`` as one numpy batch of object columns (what ``score.prepare_batch`` takes)."""
    return {k: np.array([r[k] for r in rows], dtype=object)
            for k in RAW_COLUMNS}


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows from ``expand_unit`` as an Arrow table of ``RAW_SCHEMA``: typed columns, so a column that
    is null in every row of a block stays a string (or binary) column through Ray Data."""
    return pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in RAW_SCHEMA}, schema=RAW_SCHEMA)


RAW_COLUMNS = (COL_URI, COL_DATA, COL_STATUS, COL_ERROR, COL_LABEL_HINT, COL_SLIDE_HINT, COL_PATIENT_HINT,
               COL_SOURCE_VERSION)
RAW_SCHEMA = pa.schema([(c, pa.binary() if c == COL_DATA else pa.string()) for c in RAW_COLUMNS])


def _row(uri: str, status: str, data: bytes | None = None, error: str | None = None, label_hint: str | None = None,
         slide_hint: str | None = None, patient_hint: str | None = None) -> dict:
    return {COL_URI: uri, COL_DATA: data, COL_STATUS: status, COL_ERROR: error, COL_LABEL_HINT: label_hint,
            COL_SLIDE_HINT: slide_hint, COL_PATIENT_HINT: patient_hint, COL_SOURCE_VERSION: None}


def expand_unit(unit: dict, with_data: bool = True, limits: Limits = DEFAULT_LIMITS) -> Iterator[dict]:
    """Rows (one per image, member or Parquet row) of one listed unit; never raises for bad data.

    ``with_data=False`` names the images without reading their bytes (``data`` stays None): how a
    training listing learns what an archive holds.
    """
    kind, uri = unit[COL_KIND], unit[COL_URI]
    readers = {KIND_IMAGE: _read_image, KIND_TAR: _read_tar, KIND_ZIP: _read_zip, KIND_PARQUET: _read_parquet,
               KIND_BAD_NAME: _read_bad_name}
    try:
        yield from readers[kind](uri, with_data, limits)
    except Exception as exc:  # a unit that cannot be opened at all is one error row, not a crash
        yield _row(uri, STATUS_ERROR, error=f"cannot read {kind}: {type(exc).__name__}: {exc}")


def _read_image(uri: str, with_data: bool, limits: Limits) -> Iterator[dict]:
    yield _row(uri, STATUS_OK, data=storage.read_bytes(uri) if with_data else None)


def _read_bad_name(uri: str, with_data: bool, limits: Limits) -> Iterator[dict]:
    yield _row(uri, STATUS_ERROR, error="file name is not valid UTF-8 (undecodable bytes shown as \\xNN): "
                                        "rename it to score it")


def _member_row(uri: str, raw_name: str, read, with_data: bool, seen: set[str], link: str | None = None,
                size: int = 0, packed: int = 0, limits: Limits = DEFAULT_LIMITS) -> dict:
    """The row of one archive entry: every entry is scored, an error row or counted by its status."""
    name = raw_name
    while name.startswith(("./", "/")):  # `tar -C DIR -cf x.tar .` names members ./a/b.png
        name = name[2:] if name.startswith("./") else name[1:]
    if _undecodable(name):
        return _row(member_uri(uri, _printable(name)), STATUS_ERROR,
                    error="member name is not valid UTF-8 (undecodable bytes shown as \\xNN)")
    member = member_uri(uri, name)
    if _hidden(name + "/x") or name.startswith("__MACOSX/"):
        return _row(member, STATUS_HIDDEN)
    if name in seen:
        return _row(member, STATUS_DUPLICATE)
    seen.add(name)
    if kind_of(name) != KIND_IMAGE:
        return _row(member, STATUS_NON_IMAGE)
    if link is not None:
        return _row(member, STATUS_ERROR, error=f"link member (-> {link}): links in archives are not followed")
    if size > limits.member_bytes:
        return _row(member, STATUS_ERROR, error=f"member is {size / 2**20:.1f} MiB, over the "
                                                f"{limits.member_bytes / 2**20:g} MiB cap (--max-member-mb): not read")
    if packed and size / packed > limits.compression_ratio:
        return _row(member, STATUS_ERROR, error=f"member unpacks {size / packed:.0f}x its packed size, over the "
                                                f"{limits.compression_ratio:g}x cap (--max-compression-ratio): not read")
    try:
        return _row(member, STATUS_OK, data=read() if with_data else None)
    except Exception as exc:  # CRC mismatch, truncated member, bad compression
        return _row(member, STATUS_ERROR, error=f"corrupt archive member: {type(exc).__name__}: {exc}")


def _read_tar(uri: str, with_data: bool, limits: Limits) -> Iterator[dict]:
    fs, path = storage.filesystem(uri)
    n = 0
    with fs.open(path, "rb") as raw:
        # Stream mode ("r|*") reads members in order without seeking: works on any object store.
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                seen: set[str] = set()
                for member in tar:
                    if member.isdir():
                        continue
                    n += 1
                    link = member.linkname if member.issym() or member.islnk() else None
                    if not (member.isfile() or link is not None):  # device, fifo: not an image file
                        yield _row(member_uri(uri, _printable(member.name)), STATUS_NON_IMAGE)
                        continue
                    yield _member_row(uri, member.name, lambda m=member: tar.extractfile(m).read(), with_data,
                                      seen, link, size=member.size, limits=limits)
        except (tarfile.ReadError, EOFError, OSError) as exc:
            if n == 0 and "empty" in str(exc).lower():
                yield _row(uri, STATUS_EMPTY)
                return
            # A truncated or corrupt tar: the members read so far stand, the rest is one error row.
            yield _row(member_uri(uri, f"<after member {n}>"), STATUS_ERROR,
                       error=f"corrupt tar: {type(exc).__name__}: {exc}")
            return
    if n == 0:
        yield _row(uri, STATUS_EMPTY)


def _read_zip(uri: str, with_data: bool, limits: Limits) -> Iterator[dict]:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as raw:
        # ZipFile seeks to the central directory and then to each member: ranged reads on S3.
        with zipfile.ZipFile(raw) as zf:
            n, seen = 0, set()
            for info in zf.infolist():
                if info.is_dir():
                    continue
                n += 1
                yield _member_row(uri, info.filename, lambda i=info: zf.read(i), with_data, seen,
                                  size=info.file_size, packed=info.compress_size, limits=limits)
            if n == 0:
                yield _row(uri, STATUS_EMPTY)


def _parquet_columns(schema) -> tuple[str, str | None, dict[str, str], bool]:
    """(bytes column, path column, {hint: column} for label/slide_id/patient_id, bytes-in-struct)
    of a Parquet input's schema."""
    import pyarrow as pa

    names = {n.lower(): n for n in schema.names}
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    structs = [f.name for f in schema if pa.types.is_struct(f.type)
               and any(sub.name == "bytes" for sub in f.type)]  # Hugging Face Image feature
    col = next((names[n] for n in PARQUET_BYTES_NAMES if n in names and names[n] in binary + structs), None)
    col = col or (binary[0] if binary else (structs[0] if structs else None))
    if col is None:
        raise ValueError(f"no image-bytes column (binary) in {schema.names}")
    path_col = next((names[n] for n in PARQUET_PATH_NAMES if n in names), None)
    hints = {hint: names[n] for hint, n in ((COL_LABEL_HINT, COL_LABEL), (COL_SLIDE_HINT, COL_SLIDE),
                                            (COL_PATIENT_HINT, COL_PATIENT)) if n in names}
    return col, path_col, hints, col in structs


def _read_parquet(uri: str, with_data: bool, limits: Limits) -> Iterator[dict]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as raw:
        pf = pq.ParquetFile(raw)
        col, path_col, hints, in_struct = _parquet_columns(pf.schema_arrow)
        cols = [c for c in (col if with_data else None, path_col, *hints.values()) if c]
        i = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols):
            d = batch.to_pydict()
            for j in range(batch.num_rows):
                value = d[col][j] if with_data else None
                if in_struct:
                    value = (value or {}).get("bytes")
                name = d[path_col][j] if path_col else None
                given = {h: d[c][j] for h, c in hints.items()}
                yield _row(member_uri(uri, name or f"row={i}"), STATUS_OK,
                           data=(value if value is not None else b"") if with_data else None,
                           **{h: (str(v) if v is not None else None) for h, v in given.items()})
                i += 1
        if i == 0:
            yield _row(uri, STATUS_EMPTY)


MANIFEST_COLUMNS = ("path", "slide_id", "patient_id")  # required; "label" optional


def load_manifest(manifest_uri: str, input_uri: str) -> dict[str, tuple[str | None, str | None, str | None]]:
    """``--manifest``: {image uri: (slide_id, patient_id, label)} from a CSV or Parquet file.

    ``path`` is relative to the input root (``Parasitized/a.png``, ``shard-0.tar#cells/a.png``) or
    a full URI / absolute path; ``label`` (optional) must be a class name or empty. Raises
    ``ConfigError`` for a manifest that cannot be used, with the reason.
    """
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from malaria_ray.config import ConfigError
    from malaria_ray.schema import CLASS_NAMES

    try:
        fs, path = storage.filesystem(manifest_uri)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f) if manifest_uri.lower().endswith(".parquet") else pcsv.read_csv(
                f, convert_options=pcsv.ConvertOptions(strings_can_be_null=True,
                                                       column_types={c: pa.string() for c in (*MANIFEST_COLUMNS,
                                                                                              "label")}))
    except Exception as exc:  # missing file, bad CSV: the backend's type varies
        raise ConfigError(f"--manifest {manifest_uri}: cannot read it: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise ConfigError(f"--manifest {manifest_uri} lacks column(s) {', '.join(missing)} "
                          f"(needs {', '.join(MANIFEST_COLUMNS)}, optional label)")
    cols = {c: table.column(c).to_pylist() for c in (*MANIFEST_COLUMNS, "label") if c in table.column_names}
    labels = cols.get("label", [None] * table.num_rows)
    bad = sorted({str(x) for x in labels if x not in (None, "", *CLASS_NAMES)})
    if bad:
        raise ConfigError(f"--manifest {manifest_uri}: label must be one of {', '.join(CLASS_NAMES)} or empty, "
                          f"got {', '.join(bad[:5])}")
    root = input_uri.rstrip("/")
    out = {}
    for p, slide, patient, label in zip(cols["path"], cols["slide_id"], cols["patient_id"], labels):
        if not p:
            continue
        full = p if "://" in p or p.startswith("/") else (f"{root}/{p}" if storage.is_remote(root)
                                                            else os.path.join(storage.local_path(root), p))
        out[full] = (slide or None, patient or None, label or None)
    return out
