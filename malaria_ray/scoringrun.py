"""One scoring run's commit protocol under an output root, in one object: ``ScoringRun``.

Commit protocol (layout in ``malaria_ray.outputs``): a run holds the root's lease
(``malaria_ray.lease``) from start to end. It writes ``runs/<run_id>/config.json`` and a manifest
that says ``"finished": false`` (``begin``), then streams its rows into a part in
``_staging/`` (``write``). When a part is full (``--commit-every-rows`` rows or
``--commit-every-minutes``), it is published in one atomic step (a POSIX rename locally; on S3 one
server-side copy, which creates the object whole or not at all) and the manifest lists it. At the
end (``finish``) the last part is published and the manifest says ``"finished": true`` with the
run's counts, beside its metrics row. A run killed at any point leaves whole published parts
(readers and ``--skip-scored`` count them) and at most one ``_staging`` file that none counts (a
later run deletes those older than a day: ``outputs.remove_stale_staging``); a run that fails
records why in its manifest (``fail``). ``metrics.parquet`` and ``slides.parquet`` are derived views
rebuilt at the end of a run from published files only and replaced in one write (temp + rename
locally; a single PUT on S3), so a crash before the rebuild heals on the next run.

``score`` drives it: ``with ScoringRun(...) as run``, ``begin``, ``tally`` + ``write`` per batch,
``close``, then ``finish`` (or ``fail``); ``summary`` is the finished run's one screen (the
command's stdout). Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from malaria_ray import fieldeval, logs, manifests, metrics, outputs, sources, storage, tracking
from malaria_ray import schema
from malaria_ray.config import CorpusError, ScoreConfig
from malaria_ray.lease import Lease
from malaria_ray.writer import PredictionWriter, normalize

log = logs.get("score")
SCORED, ERRORS = schema.COUNT_SCORED, schema.COUNT_ERRORS  # the counts of rows scored and of error rows
ERROR_EXAMPLES = 3  # error rows quoted in the summary


@dataclass
class RunResult:
    run_id: str
    model_id: str
    output: str
    predictions_uri: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    confusion: np.ndarray | None = None
    error_examples: list[str] = field(default_factory=list)
    completes: list[str] = field(default_factory=list)  # earlier unfinished runs this one completed
    parts: list[str] = field(default_factory=list)  # the predictions files this run published
    unchanged: int = 0  # already scored, known from the listing (size and mtime/ETag) without reading
    transient: int = 0  # error rows that may read on another try (``schema.ERROR_TRANSIENT``): not skipped next night
    fields: bool = False  # a ``--fields`` run: ``scored`` counts cells, ``fields_scored`` the photographs
    evaluation: dict | None = None  # --annotations: the run measured against them (``fieldeval``)
    overlay: list[str] = field(default_factory=list)  # the fields on its plots/fields_overlay.png, in sheet order
    registered: dict | None = None  # --model models:/...: the registered version scored (``tracking.Registered.record``)

    @property
    def rows(self) -> int:
        return self.counts.get(SCORED, 0) + self.counts.get(ERRORS, 0)

    @property
    def inputs(self) -> int:
        """Images read and scored or failed: cut-out cells, or field photographs (not their cells)."""
        return self.counts.get(schema.COUNT_FIELDS, 0) + self.counts.get(ERRORS, 0) if self.fields else self.rows

    @property
    def error_fraction(self) -> float:
        """Error rows over the images read (a field's failure is one photograph, not one cell)."""
        return self.counts.get(ERRORS, 0) / self.inputs if self.inputs else 0.0


def part_file_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


class ScoringRun:
    """The commit protocol of one run (module docstring): lease, config and manifest, the part
    writer, the run's counts and metrics, the final commit and the rebuilt views.

    A context manager: entering takes the root's lease (raises ``lease.LeaseHeld``) and removes
    stale staging files; leaving releases the lease.
    """

    def __init__(self, root: str, run_id: str) -> None:
        self.root, self.run_id = root, run_id
        self.lease = Lease(root, run_id)
        self.cfg: ScoreConfig | None = None
        self.model_id: str | None = None
        self.manifest: dict = {}
        self.writer: PredictionWriter | None = None
        self.counts: dict[str, int] = {}
        self.accumulator: metrics.MetricsAccumulator | None = None
        self.examples: list[str] = []
        self.unfinished: list[str] = []
        self.unchanged = 0
        self.error_kinds = {schema.ERROR_TRANSIENT: 0, schema.ERROR_PERMANENT: 0}  # error rows by kind
        self.n_pred_pos = 0  # cells called Parasitized
        self.slide_sums: pa.Table | None = None  # the night's own cells per slide (``metrics.evidence_sums``)

    def __enter__(self) -> "ScoringRun":
        self.lease.acquire()
        stale = outputs.remove_stale_staging(self.root)
        if stale:
            log.info(f"removed {len(stale)} staging file(s) that crashed runs left in {self.root}: "
                     f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}")
        return self

    def __exit__(self, *exc) -> None:
        self.lease.release()

    def begin(self, cfg: ScoreConfig, model_id: str, image_size: int, listing: sources.Units,
              identity_rows: int, unfinished: list[str], unchanged: int, detector: dict | None = None,
              registered: dict | None = None) -> None:
        """Write the run's config and its manifest (``finished: false``); open the part writer.
        ``unfinished``: earlier killed runs this one completes; ``unchanged``: listed loose files
        left out because this model already scored them as they are; ``detector``: a ``--fields``
        run's cell detector (its key and parameters, recorded in the manifest); ``registered``: the
        registered model version a ``models:/`` run scores (name, version, alias, MLflow run)."""
        self.cfg, self.model_id, self.unfinished, self.unchanged = cfg, model_id, unfinished, unchanged
        started = dt.datetime.now(dt.timezone.utc)  # its UTC date is the partition of all the run's parts
        storage.write_text(storage.join(outputs.run_uri(self.root, self.run_id), "config.json"),
                           dataclasses.replace(cfg, run_id=self.run_id).to_json())
        self.manifest = {
            "run_id": self.run_id, "model_id": model_id, "model": storage.redact(cfg.model),
            "input": storage.redact(cfg.input), "image_size": image_size, "identity_manifest": cfg.manifest,
            "identity_manifest_rows": identity_rows, "threshold": cfg.threshold, "finished": False, "parts": [],
            "rows_committed": 0, "completes": unfinished, "started_at": started.isoformat(),
            "partition": outputs.partition_name(outputs.scored_date(started)),
            "units": {k: listing.count(k) for k in sources.UNIT_KINDS}, "fields": cfg.fields, "detector": detector,
            "backend": cfg.backend, "precision": cfg.precision, "registered_model": registered,
            "commit": "rows are committed part by part: every file listed in `parts` is whole and final"}
        self._write_manifest()
        self.counts = {SCORED: 0, ERRORS: 0, schema.STATUS_NON_IMAGE: len(listing.skipped), schema.STATUS_EMPTY: 0,
                       schema.STATUS_ALREADY: unchanged, schema.STATUS_HIDDEN: 0, schema.STATUS_DUPLICATE: 0,
                       schema.STATUS_FOLDER_LINK: 0, **({schema.COUNT_FIELDS: 0} if cfg.fields else {})}
        self.accumulator = metrics.MetricsAccumulator(cfg.threshold)
        self.writer = PredictionWriter(self.root, self.run_id, part_rows=cfg.commit_every_rows,
                                       part_seconds=60 * cfg.commit_every_minutes, on_part=self._on_part,
                                       scored_date=outputs.scored_date(started))

    def _write_manifest(self, **update) -> None:
        self.manifest.update(update)
        manifests.write_manifest(self.root, self.run_id, self.manifest)

    def _on_part(self, writer: PredictionWriter) -> None:
        self._write_manifest(parts=[part_file_name(u) for u in writer.parts], rows_committed=writer.rows)

    def tally(self, batch: pa.Table) -> pa.Table | None:
        """Count a batch of the pipeline by row status and renew the lease; the rows to write (scored
        and error rows, in ``PREDICTIONS_SCHEMA``), or None when it holds none."""
        self.lease.renew()
        status = batch.column(schema.COL_STATUS)
        for name, n in zip(*np.unique(status.to_numpy(zero_copy_only=False).astype(str), return_counts=True)):
            key = {schema.STATUS_OK: SCORED, schema.STATUS_ERROR: ERRORS}.get(name, name)
            self.counts[key] = self.counts.get(key, 0) + int(n)
        if self.cfg.fields:  # a field's cells: it counts once, as its cell 0
            first = pc.and_(pc.equal(status, schema.STATUS_OK), pc.equal(batch.column(schema.COL_CELL), 0))
            self.counts[schema.COUNT_FIELDS] += int(pc.sum(pc.cast(pc.fill_null(first, False), pa.int64())).as_py() or 0)
        rows = batch.filter(pc.is_in(status, pa.array([schema.STATUS_OK, schema.STATUS_ERROR])))
        return normalize(rows) if rows.num_rows else None

    def write(self, rows: pa.Table) -> None:
        """Rows of ``tally`` (identities final) into the run's metrics and its open part."""
        self.accumulator.update(rows.column(schema.COL_LABEL).to_pylist(),
                                rows.column(schema.COL_PROB).to_numpy(zero_copy_only=False),
                                rows.column(schema.COL_ERROR).to_pylist())
        if len(self.examples) < ERROR_EXAMPLES:
            errs = rows.filter(pc.is_valid(rows.column(schema.COL_ERROR)))
            self.examples += [f"{u}: {e}" for u, e in zip(errs.column(schema.COL_URI).to_pylist()[:ERROR_EXAMPLES],
                                                         errs.column(schema.COL_ERROR).to_pylist()[:ERROR_EXAMPLES])]
        self.n_pred_pos += int(pc.sum(pc.cast(pc.fill_null(pc.equal(rows.column(schema.COL_PRED), schema.POSITIVE_CLASS),
                                                          False), pa.int64())).as_py() or 0)
        sums = metrics.evidence_sums(rows)
        self.slide_sums = sums if self.slide_sums is None else metrics.merge_evidence_sums([self.slide_sums, sums])
        kinds = rows.column(schema.COL_ERROR_KIND).to_pylist()
        for kind in self.error_kinds:
            self.error_kinds[kind] += kinds.count(kind)
        self.writer.write(rows)

    def close(self) -> None:
        """The last part, whole in staging (published by ``finish``)."""
        self.writer.close()

    def fail(self, exc: BaseException) -> None:
        """Drop the unpublished part; the manifest says why the run stopped."""
        self.writer.abort()
        self._write_manifest(failed=f"{type(exc).__name__}: {exc}"[:500])

    def finish(self, seconds: float, fp_rate: float | None, correction: metrics.Correction | None = None,
               truth: dict | None = None, **manifest_extra) -> RunResult:
        """Publish the run: its metrics row and plot, the last part, the finished manifest, the
        earlier runs it completes, then the rebuilt ``metrics.parquet`` and ``slides.parquet``.
        ``fp_rate``: the model's false-positive rate per cell for the slide calls (or None);
        ``correction``: what corrects the roll-ups' fractions for the model's error, or why nothing does;
        ``truth``: ``--annotations``, drawn on the field sheet."""
        if self.writer.rows == 0 and self.counts[schema.STATUS_ALREADY] == 0:
            self.writer.abort()
            raise CorpusError(f"no images found in {self.cfg.input} ({self.counts[schema.STATUS_NON_IMAGE]} non-image "
                              f"files, {self.counts[schema.STATUS_EMPTY]} empty archives)")
        acc = self.accumulator
        result = RunResult(self.run_id, self.model_id, self.root, outputs.predictions_uri(self.root), seconds,
                           self.counts, {schema.COL_RUN_ID: self.run_id, schema.COL_MODEL_ID: self.model_id, **acc.row()},
                           acc.confusion() if acc.metrics_known else None, self.examples[:ERROR_EXAMPLES],
                           completes=self.unfinished, unchanged=self.unchanged,
                           transient=self.error_kinds[schema.ERROR_TRANSIENT], fields=self.cfg.fields,
                           registered=self.manifest.get("registered_model"))
        result.metrics.update(self._night(result, fp_rate))
        manifests.write_run_metrics(self.root, self.run_id, result.metrics)
        if result.confusion is not None:
            from malaria_ray.report import confusion_png

            storage.write_bytes(storage.join(outputs.run_uri(self.root, self.run_id), "plots", "confusion_matrix.png"),
                                confusion_png(result.confusion, f"Confusion matrix, run {self.run_id}"))
        self.writer.commit()
        result.parts = [part_file_name(u) for u in self.writer.parts]
        self._write_manifest(parts=result.parts, rows_committed=self.writer.rows, finished=True, counts=self.counts,
                             entries=entries(self.counts, self.cfg.fields), unchanged_in_listing=self.unchanged,
                             error_kinds=self.error_kinds,
                             seconds=round(seconds, 3), finished_at=dt.datetime.now(dt.timezone.utc).isoformat(),
                             **manifest_extra)
        for earlier in self.unfinished:
            manifests.mark_completed(self.root, earlier, self.run_id)
        manifests.rebuild_metrics(self.root)
        outputs.rebuild_slides(self.root, self.model_id, fp_rate, correction)
        if self.cfg.fields:
            result.overlay = self._field_sheet(outputs.rebuild_fields(self.root, self.model_id, correction),
                                               result.parts, truth)
        return result

    def _night(self, result: RunResult, fp_rate: float | None) -> dict:
        """The metrics row's night columns (``schema.NIGHT_COLUMNS``): times, throughput, error rows
        by kind, cells called Parasitized, and slides called by ``metrics.CALL_RULE`` on the night's
        own cells (null without ``fp_rate``)."""
        scored, seconds = self.counts.get(SCORED, 0), result.seconds
        called = None
        if fp_rate is not None and self.slide_sums is not None and self.slide_sums.num_rows:
            slides = metrics.evidence(self.slide_sums, fp_rate, self.model_id)
            slides = slides.filter(pc.and_(pc.equal(slides.column(schema.COL_LEVEL), "slide"),
                                           pc.is_valid(slides.column(schema.COL_SLIDE))))
            called = (slides.num_rows, sum(bool(c) for c in slides.column(schema.COL_CALL).to_pylist()))
        return {
            schema.COL_STARTED_AT: dt.datetime.fromisoformat(self.manifest["started_at"]),
            schema.COL_FINISHED_AT: dt.datetime.now(dt.timezone.utc), schema.COL_SECONDS: float(seconds),
            schema.COL_IMAGES_PER_S: result.rows / seconds if seconds > 0 else None, schema.COL_N_SCORED: scored,
            schema.COL_N_FIELDS: self.counts.get(schema.COUNT_FIELDS) if self.cfg.fields else None,
            schema.COL_CELLS: schema.CELLS_FIELDS if self.cfg.fields else schema.CELLS_CROPS,
            schema.COL_N_TRANSIENT: self.error_kinds[schema.ERROR_TRANSIENT],
            schema.COL_N_PERMANENT: self.error_kinds[schema.ERROR_PERMANENT],
            schema.COL_ERROR_RATE: result.error_fraction if result.inputs else None,
            schema.COL_N_PRED_POS: self.n_pred_pos, schema.COL_POS_RATE: self.n_pred_pos / scored if scored else None,
            schema.COL_N_SLIDES: called[0] if called else None, schema.COL_N_SLIDES_POS: called[1] if called else None,
        }

    def _field_sheet(self, fields_table: pa.Table, parts: list[str], truth: dict | None = None) -> list[str]:
        """The run's ``plots/fields_overlay.png`` (``malaria_ray.overlay``). The run is committed by
        now, so a picture that cannot be drawn is a warning, never a failed night."""
        from malaria_ray import overlay

        try:
            return overlay.write_sheet(self.root, self.run_id, fields_table, parts, truth)
        except Exception as exc:
            log.warning(f"run {self.run_id} is committed, but its field overlay sheet was not drawn: "
                        f"{type(exc).__name__}: {exc}")
            return []


def entries(counts: dict[str, int], fields: bool) -> int:
    """Every file and archive member the run met, each once: the sum of the counts, where a field
    photograph whose cells were scored counts once (as ``fields_scored``), not once per cell."""
    total = sum(counts.values())
    return total - counts.get(SCORED, 0) if fields else total


def summary(result: RunResult) -> str:
    """The one-screen end-of-run summary."""
    c, m = result.counts, result.metrics
    rate = result.rows / result.seconds if result.seconds > 0 else float("nan")
    scored = [f"  images scored     {c.get(SCORED, 0):>10,}"]
    if result.fields:
        fields_rate = result.inputs / result.seconds if result.seconds > 0 else float("nan")
        scored = [f"  fields scored     {c.get(schema.COUNT_FIELDS, 0):>10,}  ({fields_rate:,.2f} fields/s; fields.parquet "
                  "has one row per field)", f"  cells scored      {c.get(SCORED, 0):>10,}  (red cells found in them)"]
    reg = result.registered
    lines = [
        f"malaria-ray score: run {result.run_id} committed (model {result.model_id}"
        + (f": {tracking.describe(reg)}" if reg else "") + ")",
        *scored,
        f"  error rows        {c.get(ERRORS, 0):>10,}  ({result.transient:,} transient: read again next night)",
        f"  already scored    {c.get(schema.STATUS_ALREADY, 0):>10,}  (skipped: --skip-scored; "
        f"{result.unchanged:,} unchanged in the listing, not read)",
        f"  non-images        {c.get(schema.STATUS_NON_IMAGE, 0):>10,}  (skipped and counted)",
        f"  empty archives    {c.get(schema.STATUS_EMPTY, 0):>10,}",
        f"  hidden members    {c.get(schema.STATUS_HIDDEN, 0):>10,}  (under '.'/'_' folders in archives; counted)",
        f"  duplicate names   {c.get(schema.STATUS_DUPLICATE, 0):>10,}  (a second archive member of one name; counted)",
        f"  folder links      {c.get(schema.STATUS_FOLDER_LINK, 0):>10,}  (links to folders: not followed; counted)",
        f"  entries           {entries(c, result.fields):>10,}  (every file and archive member: the sum of the above"
        f"{', each field once' if result.fields else ''})",
        f"  throughput        {rate:>10,.1f} images/s over {result.seconds:.1f} s",
    ]
    lines += [f"    error: {e}" for e in result.error_examples]
    lines += fieldeval.summary_lines(result.evaluation) if result.evaluation else []
    if result.confusion is not None:
        cm = result.confusion
        lines += [
            f"  labelled images   {m['n_labelled']:>10,}   (threshold {m['threshold']})",
            "                      pred Parasitized  pred Uninfected",
            f"    true Parasitized  {cm[0, 0]:>16,}  {cm[0, 1]:>15,}",
            f"    true Uninfected   {cm[1, 0]:>16,}  {cm[1, 1]:>15,}",
            f"  accuracy {m['accuracy']:.4f}  sensitivity {m['sensitivity']:.4f}  specificity {m['specificity']:.4f}"
            f"  precision {m['precision']:.4f}  f1 {m['f1']:.4f}  roc_auc {m['roc_auc']:.4f}",
        ]
    else:
        lines.append("  labels            none: an unlabelled archive (the normal night); no confusion matrix, "
                     "and metrics.parquet holds nulls for the rates")
    if result.completes:
        lines.append(f"  completes         unfinished run(s) {', '.join(result.completes)}: their committed rows "
                     "were kept and skipped here")
    lines += [
        f"  predictions       {result.predictions_uri}/ ({len(result.parts)} file(s) of this run)",
        f"  metrics, slides   {storage.join(result.output, outputs.METRICS_FILE)}, "
        f"{storage.join(result.output, outputs.SLIDES_FILE)}"
        f"{', ' + storage.join(result.output, outputs.FIELDS_FILE) if result.fields else ''}",
        f"  run files         {outputs.run_uri(result.output, result.run_id)}/",
    ]
    return "\n".join(lines)
