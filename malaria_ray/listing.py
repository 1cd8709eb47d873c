"""What an input holds: the listing of units to read, made by the driver before any byte is read.

An input is a local path, ``file://`` or ``s3://`` URI naming one file or a folder/prefix tree of
any depth. ``list_units`` names its units (``schema.KIND_*``: loose images, tar, zip, Parquet) in
one Arrow table, paged; ``malaria_ray.sources`` reads them. One entry never fails the listing:
what a local walk meets and does not open becomes a unit of its own kind, read as one error row
or one counted row (docs/operations.md, "What a listing follows"):

- a link is followed only to a regular file (inside or outside the input): its bytes are read
  under the link's own path;
- a link to a folder is not followed (``folder_link``, counted): it would bring a tree in twice,
  or another disk, or a loop; name a linked folder as ``--input`` itself to score it;
- a link whose target is gone (``dangling_link``) or that loops (``link_loop``, also a folder
  met again below itself through a bind mount), and a pipe, socket or device named like an input
  (``special_file``), are error rows, never opened (a pipe would block a read forever);
- a folder or entry that cannot be listed (denied, vanished, a hung mount past the time limit) is
  one transient error row (``unlistable``).

The input root itself is different: missing, denied or unreadable, the listing fails with one
line (``CorpusError``). Pure: imports neither Ray nor TensorFlow.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from malaria_ray import reads, storage
from malaria_ray.config import CorpusError
from malaria_ray.schema import (
    COL_KIND, COL_URI, COL_VERSION, IMAGE_SUFFIXES, KIND_DANGLING, KIND_FOLDER_LINK, KIND_IMAGE, KIND_LINK_LOOP,
    KIND_PARQUET, KIND_SPECIAL, KIND_TAR, KIND_UNLISTABLE, KIND_ZIP, PARQUET_SUFFIXES, TAR_SUFFIXES, ZIP_SUFFIXES,
)

KIND_BAD_NAME = "bad_name"  # a file whose name is not valid UTF-8: listed so that it becomes an error row
ODD_KINDS = (KIND_DANGLING, KIND_LINK_LOOP, KIND_SPECIAL, KIND_FOLDER_LINK, KIND_UNLISTABLE)
UNIT_KINDS = (KIND_IMAGE, KIND_TAR, KIND_ZIP, KIND_PARQUET, KIND_BAD_NAME, *ODD_KINDS)
_FOLDER, _FILE = "folder", "file"  # what a walked entry is, besides the odd kinds


@dataclass
class Units:
    """What the driver found under an input: units to read, and loose files it skipped.

    The units live in one Arrow table (``kind``, ``uri``, ``version``), which Ray Data reads as
    is (``ray.data.from_arrow``); docs/benchmarks.md has what it costs per unit.
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


def undecodable(name: str) -> bool:
    """A name decoded with surrogate escapes (the OS or tarfile met bytes that are not UTF-8)."""
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def printable(name: str) -> str:
    """``name`` with its undecodable bytes shown as ``\\xNN``: a string any table can hold."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def hidden(rel: str) -> bool:
    # Staging folders and dotfiles (.DS_Store, ._resource forks) are not part of an input.
    return any(part.startswith(HIDDEN_FOLDER_PREFIXES) for part in rel.split("/")[:-1])


def list_units(input_uri: str, timeout_s: float = reads.ReadPolicy.timeout_s) -> Units:
    """Every unit under ``input_uri`` (sorted), and the non-image files it skipped.

    Raises ``CorpusError`` when the input root is missing or unreadable (missing bucket, no
    access); an entry below it never does (module docstring). ``timeout_s``: the most one local
    folder may take to list. Paths stream into Arrow chunks in sorted order, one directory (local)
    or one listing page (S3, 1,000 keys) at a time, so the driver never holds a per-file info dict
    (fsspec ``find`` builds one, and keeps it in its listings cache).
    """
    fs, root = storage.filesystem(input_uri)
    prefix = storage.protocol_prefix(input_uri)
    skipped, chunks, kinds, uris, versions = [], [], [], [], []
    try:
        if fs.isfile(root):
            found, base = iter([(root, _file_version(fs, root, input_uri), _FILE)]), posixpath.dirname(root)
        elif fs.isdir(root):
            base = root
            if storage.is_s3(input_uri):
                found = ((p, v, _FILE) for p, v in _list_s3(fs, root))
            elif storage.is_remote(input_uri):  # another fsspec store: its own find, cache dropped
                found = iter(sorted((p, None, _FILE) for p in fs.find(root)))
                fs.invalidate_cache()
            else:
                found = _walk_sorted(root, timeout_s)
        else:
            raise CorpusError(f"input {input_uri} does not exist")
        for path, version, what in found:
            if hidden(posixpath.relpath(path, base) if base else path):
                continue
            kind = _unit_kind(path, what)
            if kind is None:
                skipped.append(prefix + path)
                continue
            kinds.append(kind)
            uris.append(prefix + (printable(path) if undecodable(path) else path))
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


def _unit_kind(path: str, what: str) -> str | None:
    """The unit kind of a walked entry: by name for files (None: skipped, not an input), and for a
    dangling link or a special file named like one; always for loops, folder links and what could
    not be listed (their names say nothing of what they hold)."""
    if what in (KIND_LINK_LOOP, KIND_FOLDER_LINK, KIND_UNLISTABLE):
        return what
    named = kind_of(path)
    if named is None:
        return None
    if what in (KIND_DANGLING, KIND_SPECIAL):
        return what
    return KIND_BAD_NAME if undecodable(path) else named


def _units_table(kinds: list, uris: list, versions: list) -> pa.Table:
    return pa.table({COL_KIND: pa.array(kinds, pa.string()), COL_URI: pa.array(uris, pa.string()),
                     COL_VERSION: pa.array(versions, pa.string())})


def _file_version(fs, root: str, input_uri: str) -> str | None:
    """The version of an input that is one file, spelled as the reader checks it (``reads``): a
    local file's ``size:mtime_ns`` (fsspec's ``mtime`` is float seconds, which never matches)."""
    if storage.is_remote(input_uri):
        return _version(fs.info(root))
    return reads.local_version(os.stat(root))


def _version(info: dict) -> str | None:
    """``size:etag`` or ``size:mtime`` of an fsspec info dict: what changes when the bytes do."""
    tag = info.get("ETag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{tag}" if tag is not None else None


def _classify(entry: os.DirEntry) -> tuple[str, str, str, str | None, tuple | None] | None:
    """(sort key, path, what, ``size:mtime_ns``, folder id) of one entry, from ``lstat`` and, for a
    link, ``stat`` of its target: nothing is opened. None: it vanished since the folder was read."""
    name, path = entry.name, entry.path
    try:
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return name, path, KIND_DANGLING, None, None
            except OSError as exc:
                return name, path, KIND_LINK_LOOP if exc.errno == errno.ELOOP else KIND_UNLISTABLE, None, None
            if stat.S_ISDIR(st.st_mode):
                return name, path, KIND_FOLDER_LINK, None, None
    except FileNotFoundError:
        return None
    except OSError:
        return name, path, KIND_UNLISTABLE, None, None
    if stat.S_ISDIR(st.st_mode):  # a folder sorts as its name plus "/", where sorted() puts its files
        return name + "/", path, _FOLDER, None, (st.st_dev, st.st_ino)
    if stat.S_ISREG(st.st_mode):
        return name, path, _FILE, reads.local_version(st), None
    return name, path, KIND_SPECIAL, None, None


def _scan(folder: str) -> list:
    with os.scandir(folder) as it:
        return sorted(c for c in map(_classify, it) if c is not None)


def _walk_sorted(folder: str, timeout_s: float, above: frozenset = frozenset(),
                 top: bool = True) -> Iterator[tuple[str, str | None, str]]:
    """(path, ``size:mtime_ns`` or None, what) of the entries under a local ``folder``, in sorted
    order of their full paths, holding one directory's entries per level. Each folder is listed
    (and its entries classified) within ``timeout_s``; below the top, a folder that cannot be is
    one ``unlistable`` entry. Folders ``hidden`` would drop are not entered."""
    try:
        st = os.stat(folder)
        entries = reads.within(timeout_s, _scan, folder)
    except Exception:
        if top:
            raise
        yield folder, None, KIND_UNLISTABLE
        return
    above = above | {(st.st_dev, st.st_ino)}
    for key, path, what, version, ident in entries:
        if what != _FOLDER:
            if not (what in (KIND_FOLDER_LINK, KIND_UNLISTABLE) and key.startswith(HIDDEN_FOLDER_PREFIXES)):
                yield path, version, what
        elif key.startswith(HIDDEN_FOLDER_PREFIXES):
            continue
        elif ident in above:  # a bind mount of a folder inside itself
            yield path, None, KIND_LINK_LOOP
        else:
            yield from _walk_sorted(path, timeout_s, above, top=False)


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
