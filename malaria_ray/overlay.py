"""Pictures of scored field photographs: each detected cell's box drawn in the colour of its call.

What a microscopist opens to check a night of ``score --fields``:

- ``ROOT/runs/<run_id>/plots/fields_overlay.png`` (``write_sheet``, at the end of every ``--fields``
  run): up to ``SHEET_FIELDS`` fields of that run, the most Parasitized calls first, each downscaled
  to a thumbnail titled with its name and counts, and one legend line;
- ``malaria-ray overlay --output ROOT --uri FIELD_URI [--annotations FILE] [--to out.png]``
  (``render_uri``): one field at full size, with the boxes of the newest run that scored it.

Styles: a cell called Parasitized is a thick red box with its P(Parasitized) above it; a cell
called Uninfected a thin green box; annotated boxes (``--annotations``: IML-Malaria JSON or COCO,
matched by the image's file name) are dashed, yellow for a parasite and blue for a red cell, drawn
under the detections so a call is never hidden by its truth. The image is decoded as detection
decodes it (EXIF orientation applied), so the boxes land where detection put them.

Reads only the chosen fields' rows, one row group at a time (the driver's memory does not grow
with the store). Pure: numpy, Pillow and pyarrow; imports neither Ray nor TensorFlow.
"""

from __future__ import annotations

import io
import math
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from malaria_ray import fieldeval, logs, outputs, sources, storage
from malaria_ray.annotations import FieldBoxes
from malaria_ray.config import CorpusError
from malaria_ray.fields import BOX_COLUMNS, decode_field
from malaria_ray.schema import (
    COL_CELL, COL_DATA, COL_ERROR, COL_FRAC_POS, COL_KIND, COL_N_CELLS, COL_N_PRED_POS, COL_PRED, COL_PROB, COL_RUN_ID, COL_URI,
    NEGATIVE_CLASS, POSITIVE_CLASS, path_within, split_member_uri,
)

log = logs.get("score")
SHEET_FILE = "fields_overlay.png"  # in ROOT/runs/<run_id>/plots/, beside confusion_matrix.png
SHEET_FIELDS = 12  # fields on a run's sheet: a screenful a reader checks, not the night
SHEET_COLUMNS = 4
THUMB_SIDE = 400  # px, a thumbnail's longer side: 4 x 400 px keeps the sheet one screen wide
PARASITIZED_RGB = (230, 20, 20)
UNINFECTED_RGB = (0, 170, 60)
TRUTH_POS_RGB = (255, 200, 0)
TRUTH_NEG_RGB = (40, 110, 255)
POS_WIDTH, NEG_WIDTH, TRUTH_WIDTH = 3, 1, 2  # px at the drawn size: the calls that matter stand out
DASH = 6  # px on, px off, of an annotated box's edge
LEGEND = ((PARASITIZED_RGB, False, f"{POSITIVE_CLASS} (P shown)"), (UNINFECTED_RGB, False, NEGATIVE_CLASS),
          (TRUTH_POS_RGB, True, "annotated parasite"), (TRUTH_NEG_RGB, True, "annotated red cell"))
_READ = [COL_URI, COL_RUN_ID, COL_CELL, *BOX_COLUMNS, COL_PROB, COL_PRED, COL_ERROR]


class OverlayError(CorpusError):
    """A field the output root holds no rows for, or whose image cannot be drawn: one line, exit 2."""


@dataclass
class FieldCells:
    """One run's rows of one field: boxes int [n, 4] (x, y, w, h), P(Parasitized) [n], the calls
    [n] (True: Parasitized); ``error``: why the field was not scored (then no cells)."""

    uri: str
    run_id: str
    boxes: np.ndarray
    probs: np.ndarray
    positive: np.ndarray
    error: str | None = None

    @property
    def name(self) -> str:
        return posixpath.basename(path_within(self.uri))

    def caption(self) -> str:
        if self.error:
            return f"{self.name}: not scored ({self.error})"[:120]
        return f"{self.name}: {int(self.positive.sum())} of {len(self.boxes)} cells {POSITIVE_CLASS}"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _dashed_box(draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, colour, width: int) -> None:
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = math.hypot(bx - ax, by - ay)
        for s in np.arange(0.0, length, 2 * DASH):
            e = min(s + DASH, length)
            draw.line([(ax + (bx - ax) * s / length, ay + (by - ay) * s / length),
                       (ax + (bx - ax) * e / length, ay + (by - ay) * e / length)], fill=colour, width=width)


def _strip(width: int, height: int, text: str, font_size: int) -> Image.Image:
    im = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(im).text((4, 2), text, fill="black", font=_font(font_size))
    return im


def legend(width: int, truth: bool = True, font_size: int = 13) -> Image.Image:
    """The legend line: a sample edge and the meaning of each style (the annotated ones only when
    annotated boxes are drawn)."""
    im = Image.new("RGB", (width, font_size + 10), "white")
    draw, font, x = ImageDraw.Draw(im), _font(font_size), 6
    for colour, dashed, text in (LEGEND if truth else [item for item in LEGEND if not item[1]]):
        y = (font_size + 10) // 2
        if dashed:
            _dashed_box(draw, x, y, x + 24, y, colour, TRUTH_WIDTH)
        else:
            draw.line([(x, y), (x + 24, y)], fill=colour, width=POS_WIDTH if colour == PARASITIZED_RGB else 2)
        draw.text((x + 30, 3), text, fill="black", font=font)
        x += 30 + int(draw.textlength(text, font=font)) + 18
    return im


def draw_field(image: np.ndarray, cells: FieldCells, truth: FieldBoxes | None = None, max_side: int | None = None,
               title: str | None = None, with_legend: bool = True) -> Image.Image:
    """The field (uint8 [h, w, 3], upright) with its cells' boxes (module docstring), downscaled so
    its longer side is at most ``max_side`` (boxes scaled, lines kept their width); a ``title``
    strip above and the legend below when asked."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
    im = Image.fromarray(image)
    if scale < 1.0:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    draw, font = ImageDraw.Draw(im), _font(max(10, round(14 * max(scale, 0.75))))

    def corners(box) -> tuple[float, float, float, float]:
        x, y, bw, bh = (float(v) * scale for v in box)
        return x, y, x + max(bw - 1, 1), y + max(bh - 1, 1)

    if truth is not None:
        classes = [*truth.labels, *([None] * len(truth.difficult))]
        for box, label in zip(truth.all_boxes(), classes):
            colour = TRUTH_POS_RGB if label == POSITIVE_CLASS else TRUTH_NEG_RGB
            _dashed_box(draw, *corners(box), colour, TRUTH_WIDTH)
    order = np.argsort(cells.positive, kind="stable")  # Parasitized last: on top where boxes overlap
    for i in order:
        positive = bool(cells.positive[i])
        draw.rectangle(corners(cells.boxes[i]), outline=PARASITIZED_RGB if positive else UNINFECTED_RGB,
                       width=POS_WIDTH if positive else NEG_WIDTH)
    for i in np.flatnonzero(cells.positive):
        x0, y0, _, _ = corners(cells.boxes[i])
        text = f"P {cells.probs[i]:.2f}"
        _, top, _, bottom = draw.textbbox((0, 0), text, font=font)
        at = (x0, max(0.0, y0 - (bottom - top) - top - 3))  # just above the box, inside the picture
        draw.rectangle(draw.textbbox(at, text, font=font), fill="white")
        draw.text(at, text, fill=PARASITIZED_RGB, font=font)
    parts = [*([_strip(im.width, 22, title, 14)] if title else []), im,
             *([legend(im.width, truth is not None)] if with_legend else [])]
    return _stack(parts)


def _stack(images: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for i in images:
        out.paste(i, (0, y))
        y += i.height
    return out


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def image_bytes(uri: str) -> bytes:
    """The encoded bytes of a scored image, a loose file or an archive member (read by ``sources``,
    as scoring read it)."""
    container, member = split_member_uri(uri)
    if member is None:
        return storage.read_bytes(uri)
    unit = {COL_KIND: sources.kind_of(container), COL_URI: container}
    data = next((r[COL_DATA] for r in sources.expand_unit(unit) if r[COL_URI] == uri), None)
    if data is None:
        raise OverlayError(f"{uri}: no such member in {container}")
    return bytes(data)


def read_field(uri: str) -> np.ndarray:
    """The field's pixels as detection saw them (``fields.decode_field``: EXIF applied)."""
    return decode_field(image_bytes(uri), max_pixels=10 ** 9)


def _cells(rows: pa.Table, uri: str, run_id: str) -> FieldCells:
    rows = rows.sort_by([(COL_CELL, "ascending")])
    ok = rows.filter(pc.is_null(rows.column(COL_ERROR)))
    errors = rows.filter(pc.is_valid(rows.column(COL_ERROR))).column(COL_ERROR).to_pylist()
    boxes = np.stack([ok.column(c).to_numpy(zero_copy_only=False) for c in BOX_COLUMNS], axis=1).astype(np.int64) \
        if ok.num_rows else np.zeros((0, 4), np.int64)
    return FieldCells(uri, run_id, boxes.reshape(-1, 4), ok.column(COL_PROB).to_numpy(zero_copy_only=False),
                      np.array([p == POSITIVE_CLASS for p in ok.column(COL_PRED).to_pylist()], bool),
                      errors[0] if errors and not ok.num_rows else None)


def _rows_of(root: str, uris: set[str], files: list[tuple[str, str]]) -> dict[tuple[str, str], list[pa.Table]]:
    """The rows of ``uris`` in the given committed files, by (uri, run id); one row group at a time."""
    fs, pred_path = storage.filesystem(outputs.predictions_uri(root))
    wanted, found = pa.array(sorted(uris)), {}
    for _run, name in files:
        with fs.open(posixpath.join(pred_path, name), "rb") as f:
            pf = pq.ParquetFile(f)
            storage.require_columns(pf.schema_arrow, _READ, f"{outputs.predictions_uri(root)}/{name}",
                                    outputs.PART_KIND)
            for batch in pf.iter_batches(columns=_READ, use_threads=False):
                batch = batch.filter(pc.is_in(batch.column(COL_URI), wanted))
                for uri, run in {(u, r) for u, r in zip(batch.column(COL_URI).to_pylist(),
                                                        batch.column(COL_RUN_ID).to_pylist())}:
                    mask = pc.and_(pc.equal(batch.column(COL_URI), uri), pc.equal(batch.column(COL_RUN_ID), run))
                    found.setdefault((uri, run), []).append(pa.Table.from_batches([batch.filter(mask)]))
    return found


def newest_cells(root: str, uri: str) -> FieldCells:
    """The rows of the newest run that scored ``uri`` under ``root``; ``OverlayError`` when none did."""
    by_run: dict[str, list[tuple[str, str]]] = {}
    for run, name in outputs.committed_files(root):
        by_run.setdefault(run, []).append((run, name))
    for run in reversed(list(by_run)):  # run ids sort by start time: newest first, stop at the first hit
        found = _rows_of(root, {uri}, by_run[run]).get((uri, run))
        if found:
            return _cells(pa.concat_tables(found), uri, run)
    raise OverlayError(f"{root} holds no scored rows for {uri} (give the field's URI as the uri column of "
                       f"{outputs.predictions_uri(root)} spells it)")


def render_uri(root: str, uri: str, annotations_uri: str | None = None) -> tuple[Image.Image, FieldCells]:
    """One field at full size with the newest run's boxes (and the annotated ones, when given)."""
    cells = newest_cells(root, uri)
    truth = fieldeval.load_truth(annotations_uri) if annotations_uri else None
    try:
        image = read_field(uri)
    except Exception as exc:  # moved, deleted or undecodable since it was scored: say so in one line
        raise OverlayError(f"cannot draw {uri}: {type(exc).__name__}: {exc}") from exc
    title = f"{cells.caption()}  (run {cells.run_id})"
    return draw_field(image, cells, (truth or {}).get(cells.name), title=title), cells


def choose_fields(fields_table: pa.Table, run_id: str, n: int = SHEET_FIELDS) -> list[str]:
    """The URIs for a run's sheet: the fields that run scored (``fields.parquet`` rows of that run,
    errors left out), most Parasitized calls first, then the highest fraction, then by URI."""
    t = fields_table.filter(pc.and_(pc.equal(fields_table.column(COL_RUN_ID), run_id),
                                    pc.is_null(fields_table.column(COL_ERROR))))
    rows = sorted(t.select([COL_URI, COL_N_PRED_POS, COL_FRAC_POS, COL_N_CELLS]).to_pylist(),
                  key=lambda r: (-(r[COL_N_PRED_POS] or 0), -(r[COL_FRAC_POS] or 0.0), r[COL_URI]))
    return [r[COL_URI] for r in rows[:n]]


def write_sheet(root: str, run_id: str, fields_table: pa.Table, parts: list[str],
                truth: dict[str, FieldBoxes] | None = None, n: int = SHEET_FIELDS) -> list[str]:
    """Write ``runs/<run_id>/plots/fields_overlay.png`` (module docstring) from the run's published
    ``parts``; returns the URIs drawn, in sheet order (none: no sheet)."""
    uris = choose_fields(fields_table, run_id, n)
    if not uris:
        return []
    names = set(parts)  # the manifest's file names; the files lie in the run's partition
    found = _rows_of(root, set(uris), [(r, rel) for r, rel in outputs.committed_files(root)
                                       if r == run_id and posixpath.basename(rel) in names])
    tiles = []
    for uri in uris:
        cells = _cells(pa.concat_tables(found[(uri, run_id)]), uri, run_id)
        try:
            tiles.append(draw_field(read_field(uri), cells, (truth or {}).get(cells.name), max_side=THUMB_SIDE,
                                    title=cells.caption(), with_legend=False))
        except Exception as exc:  # one unreadable field is a grey tile, not a missing sheet
            tiles.append(_strip(THUMB_SIDE, 3 * THUMB_SIDE // 4, f"{cells.name}: cannot draw ({exc})"[:80], 14))
    cols = min(SHEET_COLUMNS, len(tiles))
    cw, ch = max(t.width for t in tiles) + 8, max(t.height for t in tiles) + 8
    grid = Image.new("RGB", (cols * cw, math.ceil(len(tiles) / cols) * ch), "white")
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % cols) * cw + 4, (k // cols) * ch + 4))
    head = _strip(grid.width, 24, f"run {run_id}: {len(tiles)} fields, most {POSITIVE_CLASS} calls first", 16)
    sheet = _stack([head, grid, legend(grid.width, bool(truth))])
    storage.write_bytes(storage.join(outputs.run_uri(root, run_id), "plots", SHEET_FILE), png_bytes(sheet))
    return uris
