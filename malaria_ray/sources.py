"""Scoring inputs: stream one row per image out of each listed unit.

The driver lists *paths* only (``malaria_ray.listing``, named here as ``list_units``); the bytes
are read inside Ray Data tasks by ``expand_unit``: a loose image (.png/.jpg/.jpeg/.tif/.tiff), a
tar shard (.tar, .tar.gz, .tgz), a zip archive (NIH publishes the corpus as one zip) or a Parquet
file with an image-bytes column, one archive member or Parquet row at a time, so no process holds
an archive. Every read is bounded in time and retried after transient failures (``reads``).

Every row ``expand_unit`` yields has a ``status`` (``malaria_ray.schema``): ``ok`` (bytes to
score), ``error`` (an input that exists but could not be read; it becomes an error row, with its
``error_kind``: transient or permanent), ``non_image`` (skipped and counted), ``empty_archive``,
``folder_link`` (counted). Training and scoring read through these same functions. Pure: imports
neither Ray nor TensorFlow.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from malaria_ray import listing, reads, storage
from malaria_ray.schema import (
    COL_DATA, COL_ERROR, COL_ERROR_KIND, COL_KIND, COL_LABEL, COL_LABEL_HINT, COL_PATIENT, COL_PATIENT_HINT, COL_SLIDE,
    COL_SLIDE_HINT, COL_SOURCE_VERSION, COL_STATUS, COL_URI, COL_VERSION, ERROR_PERMANENT, ERROR_TRANSIENT,
    KIND_DANGLING, KIND_FOLDER_LINK, KIND_IMAGE, KIND_LINK_LOOP, KIND_PARQUET, KIND_SPECIAL, KIND_TAR,
    KIND_UNLISTABLE, KIND_ZIP, STATUS_DUPLICATE, STATUS_EMPTY, STATUS_ERROR, STATUS_FOLDER_LINK, STATUS_HIDDEN,
    STATUS_NON_IMAGE, STATUS_OK, member_uri,
)

# The listing (``malaria_ray.listing``), named here too: training and scoring list through ``sources``.
UNIT_KINDS, KIND_BAD_NAME, Units, kind_of, list_units = (listing.UNIT_KINDS, listing.KIND_BAD_NAME, listing.Units,
                                                        listing.kind_of, listing.list_units)
_undecodable, _printable, _hidden = listing.undecodable, listing.printable, listing.hidden

# Parquet inputs: the first column found by these names (or the only binary column) holds bytes.
PARQUET_BYTES_NAMES = ("image", "image_bytes", "bytes", "data", "content", "png")
PARQUET_PATH_NAMES = ("uri", "path", "filename", "file_name", "name")
PARQUET_BATCH_ROWS = 256


@dataclass(frozen=True)
class Limits:
    """Caps checked on an archive member's header before any of its bytes are read: over either
    is an error row, never an out-of-memory kill (a zip bomb declares a small packed size); and
    how long one read may take, how often a transient failure is tried (``reads.ReadPolicy``)."""

    member_bytes: int = 64 * 2**20  # --max-member-mb
    compression_ratio: float = 100.0  # --max-compression-ratio (zip members: unpacked / packed)
    read_timeout_s: float = reads.ReadPolicy.timeout_s  # --read-timeout-s
    read_attempts: int = reads.ReadPolicy.attempts  # --read-attempts

    @classmethod
    def of(cls, cfg) -> "Limits":
        """The limits a ``ScoreConfig`` sets."""
        return cls(int(cfg.max_member_mb * 2**20), cfg.max_compression_ratio, cfg.read_timeout_s, cfg.read_attempts)

    @property
    def policy(self) -> reads.ReadPolicy:
        return reads.ReadPolicy(self.read_timeout_s, self.read_attempts)


DEFAULT_LIMITS = Limits()


def rows_to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows from ``expand_unit`` as one numpy batch of object columns (what ``score.prepare_batch`` takes)."""
    return {k: np.array([r[k] for r in rows], dtype=object)
            for k in RAW_COLUMNS}


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows from ``expand_unit`` as an Arrow table of ``RAW_SCHEMA``: typed columns, so a column that
    is null in every row of a block stays a string (or binary) column through Ray Data."""
    return pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in RAW_SCHEMA}, schema=RAW_SCHEMA)


RAW_COLUMNS = (COL_URI, COL_DATA, COL_STATUS, COL_ERROR, COL_LABEL_HINT, COL_SLIDE_HINT, COL_PATIENT_HINT,
               COL_SOURCE_VERSION, COL_ERROR_KIND)
RAW_SCHEMA = pa.schema([(c, pa.binary() if c == COL_DATA else pa.string()) for c in RAW_COLUMNS])


def _row(uri: str, status: str, data: bytes | None = None, error: str | None = None, label_hint: str | None = None,
         slide_hint: str | None = None, patient_hint: str | None = None, transient: bool = False) -> dict:
    """One raw row; an error row is permanent unless ``transient`` (``schema.COL_ERROR_KIND``)."""
    kind = None if error is None else (ERROR_TRANSIENT if transient else ERROR_PERMANENT)
    return {COL_URI: uri, COL_DATA: data, COL_STATUS: status, COL_ERROR: error, COL_LABEL_HINT: label_hint,
            COL_SLIDE_HINT: slide_hint, COL_PATIENT_HINT: patient_hint, COL_SOURCE_VERSION: None, COL_ERROR_KIND: kind}


def _failed(uri: str, what: str, exc: BaseException) -> dict:
    """The error row of a read that raised: transient or permanent by ``reads.is_transient``."""
    return _row(uri, STATUS_ERROR, error=f"{what}: {type(exc).__name__}: {storage.redact(str(exc))}",
                transient=reads.is_transient(exc))


def expand_unit(unit: dict, with_data: bool = True, limits: Limits = DEFAULT_LIMITS) -> Iterator[dict]:
    """Rows (one per image, member or Parquet row) of one listed unit; never raises for bad data.

    ``with_data=False`` names the images without reading their bytes (``data`` stays None): how a
    training listing learns what an archive holds.
    """
    kind, uri, version = unit[COL_KIND], unit[COL_URI], unit.get(COL_VERSION)
    if kind in _ODD:
        yield _ODD[kind](uri, limits)
        return
    readers = {KIND_IMAGE: _read_image, KIND_TAR: _read_tar, KIND_ZIP: _read_zip, KIND_PARQUET: _read_parquet,
               KIND_BAD_NAME: _read_bad_name}
    try:
        yield from readers[kind](uri, with_data, limits, version)
    except Exception as exc:  # a unit that cannot be opened at all is one error row, not a crash
        yield _failed(uri, f"cannot read {kind}", exc)


def _read_image(uri: str, with_data: bool, limits: Limits, version: str | None = None) -> Iterator[dict]:
    yield _row(uri, STATUS_OK, data=reads.read_whole(uri, version, limits.policy) if with_data else None)


def _link_target(uri: str) -> str:
    try:
        return os.readlink(storage.local_path(uri))
    except OSError as exc:
        return f"? ({exc.strerror})"


def _special_type(uri: str) -> str:
    import stat

    try:
        mode = os.lstat(storage.local_path(uri)).st_mode
    except OSError:
        return "special file"
    return ("named pipe" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else
            "device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "special file")


def _unlistable(uri: str, limits: Limits) -> dict:
    """A folder or entry the listing could not list: listed again here, for the reason."""
    try:
        reads.within(limits.read_timeout_s, os.listdir, storage.local_path(uri))
        reason = "could be listed again only after the night's listing: its images are read next night"
    except NotADirectoryError:
        reason = "could not be stat'ed when listed: read next night"
    except Exception as exc:  # noqa: BLE001 - the reason is the row's error
        reason = f"{type(exc).__name__}: {exc}"
    return _row(uri, STATUS_ERROR, error=f"cannot list this folder or entry: {reason}", transient=True)


_ODD = {  # what the listing met and did not open (``listing``): one row each
    KIND_DANGLING: lambda uri, limits: _row(uri, STATUS_ERROR, error=f"symbolic link to a missing target "
                                                                    f"(-> {_link_target(uri)}): not read"),
    KIND_LINK_LOOP: lambda uri, limits: _row(uri, STATUS_ERROR, error="symbolic link loop (or a folder met again "
                                                                     "below itself): not followed"),
    KIND_SPECIAL: lambda uri, limits: _row(uri, STATUS_ERROR, error=f"a {_special_type(uri)}, not a regular file: "
                                                                   "never opened"),
    KIND_FOLDER_LINK: lambda uri, limits: _row(uri, STATUS_FOLDER_LINK),
    KIND_UNLISTABLE: _unlistable,
}


def _read_bad_name(uri: str, with_data: bool, limits: Limits, version: str | None = None) -> Iterator[dict]:
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
    except Exception as exc:  # CRC mismatch, truncated member, bad compression; or a read that timed out
        return _failed(member, "unreadable archive member" if reads.is_transient(exc) else "corrupt archive member",
                       exc)


def _read_tar(uri: str, with_data: bool, limits: Limits, version: str | None = None) -> Iterator[dict]:
    n = 0
    with reads.open_steady(uri, version, limits.policy) as raw:
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
            # A truncated or corrupt tar, or a read that failed: the members read so far stand,
            # the rest is one error row.
            yield _failed(member_uri(uri, f"<after member {n}>"), "unreadable tar" if reads.is_transient(exc)
                          else "corrupt tar", exc)
            return
    if n == 0:
        yield _row(uri, STATUS_EMPTY)


def _read_zip(uri: str, with_data: bool, limits: Limits, version: str | None = None) -> Iterator[dict]:
    with reads.open_steady(uri, version, limits.policy) as raw:
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


def _read_parquet(uri: str, with_data: bool, limits: Limits, version: str | None = None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with reads.open_steady(uri, version, limits.policy) as raw:
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
