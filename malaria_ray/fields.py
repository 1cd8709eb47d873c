"""Field photographs -> cell rows: the detection stage of ``score --fields``.

A Ray Data CPU task takes raw rows of whole field images (``ingest.read_raw``: bytes, status,
hints) and gives one row per red cell that ``detect.detect_cells`` finds: the cell's id (the
field's sha256 plus its box: ``cell_id``), the field's URI and id, the box, the mask area, the
field's flags, the detector's key and the masked crop at the model's input size. A field that
yields no cell row still yields one row, so nothing is lost: an error row when it cannot be
scored (undecodable, grayscale, over the pixel cap, no red cells found: ``error`` says which), or
the counted status of the raw row (non-images, ``already_scored``). The model actors then score
the cells like cut-out cells. Imports neither Ray nor TensorFlow.

Labels: a field's folder or manifest label is not a cell's; cell rows carry no label.
"""

from __future__ import annotations

import hashlib

import numpy as np

from malaria_ray import corpus
from malaria_ray.detect import FieldError, detect_cells
from malaria_ray.ingest import NO_IDS, image_id_of, in_sorted
from malaria_ray.preprocess import DecodeError, decode_rgb
from malaria_ray.schema import (
    COL_BOX_H, COL_BOX_W, COL_BOX_X, COL_BOX_Y, COL_CELL, COL_CELL_AREA, COL_DATA, COL_DETECTOR, COL_ERROR, COL_ERROR_KIND,
    ERROR_PERMANENT,
    COL_FIELD_FLAGS, COL_FIELD_ID, COL_IMAGE_ID, COL_LABEL, COL_LABEL_HINT, COL_PATIENT, COL_PATIENT_HINT, COL_PIXELS,
    COL_SLIDE, COL_SLIDE_HINT, COL_SOURCE_VERSION, COL_STATUS, COL_URI, STATUS_ALREADY, STATUS_ERROR, STATUS_OK,
)
from malaria_ray.segment import DetectParams

MAX_FIELD_PIXELS = 25_000_000  # ``--max-field-megapixels`` default: a 5,000 x 5,000 field; detection is ~linear in pixels
MIN_LONG_SIDE = 400  # px; NIH's cut-out cells are at most ~400 px, a microscope camera's field 640 px and up
COLOR_MODES = ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
BOX_COLUMNS = (COL_BOX_X, COL_BOX_Y, COL_BOX_W, COL_BOX_H)
_TEXT = (COL_URI, COL_STATUS, COL_ERROR, COL_ERROR_KIND, COL_IMAGE_ID, COL_FIELD_ID, COL_SLIDE, COL_PATIENT, COL_LABEL,
         COL_SOURCE_VERSION, COL_FIELD_FLAGS, COL_DETECTOR)
_NUMBERS = (COL_CELL, *BOX_COLUMNS, COL_CELL_AREA)


def cell_id(field_id: str, box) -> str:
    """A cell's image id: sha256 of its field's id and its box, so two cells of one field never
    share an id (roll-ups and --skip-scored count them apart) and a rescore finds the same id."""
    x, y, w, h = (int(v) for v in box)
    return hashlib.sha256(f"{field_id}:{x},{y},{w},{h}".encode()).hexdigest()


def decode_field(data: bytes, max_pixels: int = MAX_FIELD_PIXELS) -> np.ndarray:
    """A field photograph as uint8 RGB, upright; raises ``DecodeError`` for bytes that are not
    one, an image over ``max_pixels``, or one without colour (detection reads the stain's colour)."""
    rgb, mode = decode_rgb(data, max_pixels)
    if max(rgb.size) < MIN_LONG_SIDE:
        raise DecodeError(f"{rgb.size[0]}x{rgb.size[1]} px is a cut-out cell, not a field photograph (the longer "
                          f"side under {MIN_LONG_SIDE} px): score cut-out cells without --fields")
    if mode not in COLOR_MODES:
        raise DecodeError(f"a {mode} (grayscale) image: detection needs the stain's colour, so a field "
                          "photograph must be RGB")
    return np.asarray(rgb, dtype=np.uint8)


def prepare_fields(batch: dict[str, np.ndarray], image_size: int, params: dict | None = None,
                   skip_fields: np.ndarray = NO_IDS, known: corpus.Identities | None = None,
                   max_pixels: int = MAX_FIELD_PIXELS) -> dict[str, np.ndarray]:
    """Raw rows of field images -> one row per cell found (module docstring), ``image_size`` crops.

    ``params``: ``DetectParams.to_dict()`` (None: the defaults); ``skip_fields``: sorted field ids
    this model and detector already scored (``--skip-scored``): such a field is one
    ``already_scored`` row, not detected again; ``known``: the ``--manifest`` identities.
    """
    p = DetectParams.from_dict(params) if params is not None else DetectParams()
    key = p.key()
    rows: list[dict] = []
    crops: list[np.ndarray] = []
    for i in range(len(batch[COL_URI])):
        uri, data, status = batch[COL_URI][i], batch[COL_DATA][i], batch[COL_STATUS][i]
        base = {COL_URI: uri, COL_STATUS: status, COL_ERROR: batch[COL_ERROR][i], COL_DETECTOR: key,
                COL_SOURCE_VERSION: batch[COL_SOURCE_VERSION][i] if COL_SOURCE_VERSION in batch else None,
                COL_ERROR_KIND: batch[COL_ERROR_KIND][i] if COL_ERROR_KIND in batch else None}
        if status not in (STATUS_OK, STATUS_ERROR):
            rows.append(base)  # non-images and empty archives travel on only to be counted
            continue
        _, base[COL_SLIDE], base[COL_PATIENT] = corpus.identify(
            uri, known, batch[COL_LABEL_HINT][i], batch[COL_SLIDE_HINT][i], batch[COL_PATIENT_HINT][i])
        field_id = image_id_of(data if status == STATUS_OK else None, uri)
        base[COL_FIELD_ID] = base[COL_IMAGE_ID] = field_id
        if in_sorted(skip_fields, field_id):
            rows.append({**base, COL_STATUS: STATUS_ALREADY})
            continue
        if status == STATUS_ERROR:  # the read's error row, transient or permanent as the read said
            rows.append({**base, COL_ERROR_KIND: base[COL_ERROR_KIND] or ERROR_PERMANENT})
            continue
        try:
            found = detect_cells(decode_field(bytes(data), max_pixels), image_size, p)
        except (DecodeError, FieldError) as exc:  # the bytes are what they are: permanent
            rows.append({**base, COL_STATUS: STATUS_ERROR, COL_ERROR: str(exc), COL_ERROR_KIND: ERROR_PERMANENT})
            continue
        flags = ",".join(found.flags) or None
        if not len(found):
            rows.append({**base, COL_STATUS: STATUS_ERROR, COL_FIELD_FLAGS: flags, COL_ERROR_KIND: ERROR_PERMANENT,
                         COL_ERROR: f"no red cells found in the field ({flags}; {found.n_candidates} candidate "
                                    f"segments, rejected: {found.rejected})"})
            continue
        for j, (box, area) in enumerate(zip(found.boxes, found.areas)):
            rows.append({**base, COL_IMAGE_ID: cell_id(field_id, box), COL_CELL: j, COL_CELL_AREA: int(area),
                         COL_FIELD_FLAGS: flags, **{c: int(v) for c, v in zip(BOX_COLUMNS, box)}})
        crops.append(found.crops)
    return _columns(rows, crops, image_size)


def _columns(rows: list[dict], crops: list[np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Rows -> the numpy batch Ray Data takes; the crops are stacked in row order (only cell rows
    have one: the others get black pixels, never read, as ``ingest.prepare_batch`` does)."""
    n = len(rows)
    pixels = np.zeros((n, image_size, image_size, 3), np.uint8)
    cells = np.fromiter((COL_CELL in r for r in rows), bool, count=n)
    if crops:
        pixels[cells] = np.concatenate(crops)
    out = {c: np.array([r.get(c) for r in rows], dtype=object) for c in _TEXT}
    # Numbers as float64 with NaN where a row has none (not a cell): normalize makes them nulls.
    out.update({c: np.array([r.get(c, np.nan) for r in rows], dtype=np.float64) for c in _NUMBERS})
    out[COL_PIXELS] = pixels
    return out
