"""``malaria-ray migrate ROOT``: move the predictions parts of a root written before the
``scored_date=`` partitions (``predictions/<run_id>.partNNNNN.parquet``) into them
(``malaria_ray.outputs``, layout), so that the root is read again by ``score`` and every reader.

Each part goes to the partition of its run's start date: the manifest's ``started_at``, else the
date a default run id begins with (``20250101T...``), else the part's own modification time (UTC).
It holds the root's lease (``malaria_ray.lease``), so no scoring run writes meanwhile. Each move
is one step that publishes the part whole, as the writer does (a rename locally; on S3 a
server-side copy, then the old object is deleted): a migration stopped half-way leaves every
part readable, and run again it finishes (a part already in its partition, with the same size,
only loses its old copy). Manifests keep listing parts by file name; each migrated run's
manifest gains its ``partition``. The old ``predictions/_staging/`` (unpublished leftovers of
crashed runs, which DuckDB's ``**`` glob would meet) is emptied. Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import re
from dataclasses import dataclass, field

from malaria_ray import manifests, outputs, storage
from malaria_ray.lease import Lease

_DEFAULT_RUN_ID = re.compile(r"^(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})T\d{6}Z-")
MIGRATE_LEASE = "malaria-ray-migrate"  # the lease holder's name while it runs


@dataclass
class Migration:
    root: str
    moved: int = 0
    runs: dict[str, str] = field(default_factory=dict)  # run id -> its partition
    staging_removed: int = 0

    def summary(self) -> str:
        if not self.moved and not self.staging_removed:
            return f"malaria-ray migrate: {self.root} is already in the partitioned layout: nothing to move"
        where = ", ".join(sorted(set(self.runs.values())))
        return (f"malaria-ray migrate: moved {self.moved} part(s) of {len(self.runs)} run(s) into "
                f"{outputs.predictions_uri(self.root)}/{{{where}}}; removed {self.staging_removed} unpublished "
                "staging file(s)")


def run_date(root: str, run_id: str, fs, part_path: str) -> str:
    """The UTC start date of ``run_id`` (module docstring: manifest, run id, file time)."""
    started = (manifests.read_manifest(root, run_id) or {}).get("started_at")
    if started:
        when = dt.datetime.fromisoformat(started)
        return outputs.scored_date(when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc))
    m = _DEFAULT_RUN_ID.match(run_id)
    if m:
        return f"{m['y']}-{m['m']}-{m['d']}"
    modified = fs.modified(part_path)
    return outputs.scored_date(modified if modified.tzinfo else modified.replace(tzinfo=dt.timezone.utc))


def migrate(root: str) -> Migration:
    """Move ``root``'s flat parts into their partitions (module docstring); what was done."""
    if not storage.exists(root):
        raise storage.StorageError(f"{root} does not exist: nothing to migrate")
    done = Migration(root)
    lease = Lease(root, MIGRATE_LEASE)
    lease.acquire()
    try:
        _, flat = outputs.list_parts(root)
        fs, pred = storage.filesystem(outputs.predictions_uri(root))
        for run_id, _, name in flat:
            lease.renew()
            src = posixpath.join(pred, name)
            if run_id not in done.runs:
                done.runs[run_id] = outputs.partition_name(run_date(root, run_id, fs, src))
            dst = posixpath.join(pred, done.runs[run_id], name)
            _move(fs, root, src, dst)
            done.moved += 1
        for run_id, partition in done.runs.items():
            m = manifests.read_manifest(root, run_id)
            if m is not None and m.get("partition") != partition:
                manifests.write_manifest(root, run_id, {**m, "partition": partition})
        old_staging = posixpath.join(pred, outputs.STAGING_DIR)
        fs.invalidate_cache(old_staging)
        if fs.exists(old_staging):  # the lease is held: no run of this root is writing there
            leftovers = fs.find(old_staging)
            done.staging_removed = len(leftovers)
            fs.rm(old_staging, recursive=True)
    finally:
        lease.release()
    return done


def _move(fs, root: str, src: str, dst: str) -> None:
    """Publish ``src`` at ``dst`` whole, then drop ``src`` (a rerun after a stop between the two
    finds ``dst`` whole, of the same size, and only drops ``src``)."""
    if fs.exists(dst):
        if fs.size(dst) != fs.size(src):
            raise storage.StorageError(f"{dst} exists and differs from {src}: two parts of one name; move one "
                                       "out of the output root")
        fs.rm(src)
        return
    if storage.is_remote(root):
        fs.copy(src, dst)  # server-side CopyObject: the object appears whole
        fs.rm(src)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
