"""``malaria-ray report``: one self-contained HTML page of an output root's nights.

The page: the drift verdict of the latest night (``nights.drift``, the same call ``score
--alarm-drift`` exits on), its summary, plots of the last ``--nights`` nights (images, predicted-
Parasitized rate and error rate with the latest night's band, throughput, slides called
Parasitized), a table of those nights, and the latest night's disputed cells: its most confident
calls each way, as images. Every picture is an inline PNG (a ``data:`` URI, matplotlib Agg); the page
loads nothing from anywhere and runs no script, so it opens from a mail attachment or a bucket.

Disputed cells are read as scoring read them (``overlay.image_bytes``: a loose file or an archive
member, local or s3://); a field's cell is cut from its photograph by the row's box. An image that
cannot be read is left out with a note: a missing picture never fails the report.

Pure: pyarrow, Pillow, matplotlib; imports neither Ray nor TF.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from malaria_ray import nights as nt
from malaria_ray import outputs, storage
from malaria_ray.config import CorpusError
from malaria_ray.fields import BOX_COLUMNS
from malaria_ray.report import _png, _pyplot
from malaria_ray.schema import (
    COL_CELLS, COL_ERROR, COL_ERROR_RATE, COL_FINISHED_AT, COL_IMAGES_PER_S, COL_LABEL, COL_MODEL_ID, COL_N_ERRORS,
    COL_N_FIELDS, COL_N_IMAGES, COL_N_LABELLED, COL_N_PERMANENT, COL_N_PRED_POS, COL_N_SCORED, COL_N_SLIDES,
    COL_N_SLIDES_POS, COL_N_TRANSIENT, COL_POS_RATE, COL_PRED, COL_PROB, COL_RUN_ID, COL_SECONDS, COL_STARTED_AT,
    COL_THRESHOLD, COL_URI, NEGATIVE_CLASS, POSITIVE_CLASS,
)

REPORT_FILE = "report.html"  # default: OUTPUT_ROOT/report.html
NIGHTS_SHOWN = 30  # nights plotted and tabled (the band always looks back nights.DRIFT_NIGHTS)
DISPUTED = 6  # cells shown each way
THUMB = 96  # px, a disputed cell's side on the page
CELL_PAD = 4  # px around a field cell's box


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _label(r: dict) -> str:
    when = nt._when(r.get(COL_STARTED_AT))
    return when.strftime("%m-%d %H:%M") if when else str(r.get(COL_RUN_ID))[:12]


def _plot(rows: list[dict], key: str, title: str, ylabel: str, latest: nt.Band | None = None,
          flags: list[bool] | None = None, percent: bool = False) -> bytes:
    """One series over the nights shown; the latest night's band shaded; flagged nights in red."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 2.3))
    x = np.arange(len(rows))
    y = np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows]) * (100 if percent else 1)
    ax.plot(x, y, marker="o", ms=3, color="#1f5fa8")
    if latest is not None and latest.low is not None:
        scale = 100 if percent else 1
        ax.axhspan(latest.low * scale, latest.high * scale, color="#9cc3e6", alpha=0.35,
                   label=f"band of the latest night ({latest.nights} nights)")
        ax.legend(loc="upper left", fontsize=7)
    for i, flagged in enumerate(flags or []):
        if flagged and not np.isnan(y[i]):
            ax.plot(x[i], y[i], marker="o", ms=8, color="#d62020", zorder=3)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    step = max(1, len(rows) // 10)
    ax.set_xticks(x[::step], [_label(r) for r in rows[::step]], fontsize=7, rotation=20)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def disputed(root: str, run_id: str, n: int = DISPUTED) -> tuple[list[dict], list[dict]]:
    """The run's ``n`` most confident Parasitized calls (highest P first) and Uninfected calls
    (lowest P first), read part by part (a night's rows are never held whole)."""
    cols = [COL_URI, COL_PROB, COL_PRED, COL_LABEL, COL_ERROR, *BOX_COLUMNS]
    fs, pred_path = storage.filesystem(outputs.predictions_uri(root))
    best: dict[str, pa.Table | None] = {POSITIVE_CLASS: None, NEGATIVE_CLASS: None}
    for run, name in outputs.committed_files(root):
        if run != run_id:
            continue
        with fs.open(posixpath.join(pred_path, name), "rb") as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(columns=[c for c in cols if c in pf.schema_arrow.names]):
                t = pa.Table.from_batches([batch])
                t = t.filter(pc.is_null(t.column(COL_ERROR)))
                for call, order in ((POSITIVE_CLASS, "descending"), (NEGATIVE_CLASS, "ascending")):
                    mine = t.filter(pc.equal(t.column(COL_PRED), call))
                    both = mine if best[call] is None else pa.concat_tables([best[call], mine], promote_options="default")
                    best[call] = both.sort_by([(COL_PROB, order)]).slice(0, n)
    return tuple([] if best[c] is None else best[c].to_pylist() for c in (POSITIVE_CLASS, NEGATIVE_CLASS))


def cell_png(row: dict, fields_cache: dict) -> bytes:
    """The cell as a PNG thumbnail: a cut-out cell whole, a field's cell cut by its box."""
    from PIL import Image

    from malaria_ray import overlay

    uri = row[COL_URI]
    if row.get(BOX_COLUMNS[0]) is None:
        im = Image.open(io.BytesIO(overlay.image_bytes(uri))).convert("RGB")
    else:
        if uri not in fields_cache:
            fields_cache[uri] = overlay.read_field(uri)
        field = fields_cache[uri]
        x, y, w, h = (int(row[c]) for c in BOX_COLUMNS)
        y0, x0 = max(y - CELL_PAD, 0), max(x - CELL_PAD, 0)
        im = Image.fromarray(np.ascontiguousarray(field[y0:y + h + CELL_PAD, x0:x + w + CELL_PAD, :3]))
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _cells_html(rows: list[dict], fields_cache: dict) -> tuple[str, list[str]]:
    figs, notes = [], []
    for r in rows:
        try:
            png = cell_png(r, fields_cache)
        except Exception as exc:  # any reader's failure: the page goes on without this picture
            notes.append(f"{storage.redact(r[COL_URI])}: not shown ({type(exc).__name__}: {str(exc)[:160]})")
            continue
        label = f", label {r[COL_LABEL]}" if r.get(COL_LABEL) else ""
        figs.append(f'<figure><img src="{data_uri(png)}" alt="cell" width="{THUMB}" height="{THUMB}">'
                    f'<figcaption>P={r[COL_PROB]:.3f}{html.escape(label)}<br><span class="uri">'
                    f'{html.escape(storage.redact(r[COL_URI]) or "")}</span></figcaption></figure>')
    return "".join(figs) or "<p>none</p>", notes


def _fmt(v, kind: str = "") -> str:
    if v is None:
        return "&ndash;"
    if kind == "%":
        return f"{v:.2%}"
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(v, float):
        return f"{v:,.1f}" if kind == "1" else f"{v:.4g}"
    return html.escape(f"{v:,}" if isinstance(v, int) else str(v))


def _summary(r: dict) -> str:
    cells = r.get(COL_CELLS) or "cut-out cells"
    images = (f"{_fmt(r.get(COL_N_FIELDS))} field photographs, {_fmt(r.get(COL_N_SCORED))} {html.escape(cells)} scored"
              if r.get(COL_N_FIELDS) is not None else f"{_fmt(r.get(COL_N_SCORED))} {html.escape(cells)} scored")
    items = [
        ("run", _fmt(r.get(COL_RUN_ID))), ("model, threshold", f"{_fmt(r.get(COL_MODEL_ID))}, {_fmt(r.get(COL_THRESHOLD))}"),
        ("started, finished", f"{_fmt(nt._when(r.get(COL_STARTED_AT)))}, {_fmt(nt._when(r.get(COL_FINISHED_AT)))}"),
        ("duration", f"{_fmt(r.get(COL_SECONDS), '1')} s, {_fmt(r.get(COL_IMAGES_PER_S), '1')} images/s"),
        ("images", images),
        ("error rows", f"{_fmt(r.get(COL_N_ERRORS))} ({_fmt(r.get(COL_N_TRANSIENT))} transient, "
                       f"{_fmt(r.get(COL_N_PERMANENT))} permanent), error rate {_fmt(r.get(COL_ERROR_RATE), '%')}"),
        ("called Parasitized", f"{_fmt(r.get(COL_N_PRED_POS))} cells, rate {_fmt(r.get(COL_POS_RATE), '%')}"),
        ("slides called Parasitized", f"{_fmt(r.get(COL_N_SLIDES_POS))} of {_fmt(r.get(COL_N_SLIDES))}"),
        ("labelled cells", _fmt(r.get(COL_N_LABELLED)) + ("" if not r.get(COL_N_LABELLED) else
                                                          f": accuracy {_fmt(r.get('accuracy'), '%')}, sensitivity "
                                                          f"{_fmt(r.get('sensitivity'), '%')}, specificity "
                                                          f"{_fmt(r.get('specificity'), '%')}")),
    ]
    return "<table class='kv'>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in items) + "</table>"


def _table(rows: list[dict], flags: list[dict[str, nt.Band]]) -> str:
    head = ("started", "run", "images", "error rate", "Parasitized rate", "images/s", "slides called", "drift")
    body = []
    for r, f in zip(reversed(rows), reversed(flags)):
        drift = ", ".join(nt.DRIFT_METRICS[m] for m, b in f.items() if b.flagged)
        body.append("<tr" + (" class='flag'" if drift else "") + ">" + "".join(f"<td>{c}</td>" for c in (
            _fmt(nt._when(r.get(COL_STARTED_AT))), _fmt(r.get(COL_RUN_ID)), _fmt(r.get(COL_N_IMAGES)),
            _fmt(r.get(COL_ERROR_RATE), "%"), _fmt(r.get(COL_POS_RATE), "%"), _fmt(r.get(COL_IMAGES_PER_S), "1"),
            f"{_fmt(r.get(COL_N_SLIDES_POS))} / {_fmt(r.get(COL_N_SLIDES))}", html.escape(drift) or "no"))
            + "</tr>")
    return ("<table class='nights'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body)
            + "</table>")


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ccc}
.drift{padding:.6em 1em;border-radius:4px;margin:.3em 0}.drift.flag{background:#fde2e2;border:1px solid #d62020}
.drift.ok{background:#e5f4e8;border:1px solid #3a9a4f}table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}tr.flag td{background:#fde2e2}
figure{display:inline-block;margin:4px;width:140px;vertical-align:top;font-size:.7em}
.uri{color:#666;word-break:break-all}.note{color:#a05000;font-size:.8em}img{max-width:100%}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:8px;margin-bottom:1em}"""


def render(root: str, nights_shown: int = NIGHTS_SHOWN, k: float = nt.DRIFT_K,
           drift_nights: int = nt.DRIFT_NIGHTS) -> tuple[dict[str, nt.Band], str]:
    """The latest night's bands, and the page of ``root`` (module docstring) as HTML text."""
    rows = nt.load(root)
    if not rows:
        raise CorpusError(f"no finished scoring run in {storage.redact(root)}'s {outputs.METRICS_FILE}")
    start = max(0, len(rows) - nights_shown)
    flags = [nt.drift_at(rows, i, k, drift_nights) for i in range(start, len(rows))]
    shown, latest, bands = rows[start:], rows[-1], flags[-1]
    verdict = "".join(f"<div class='drift {'flag' if b.flagged else 'ok'}'>{'DRIFT: ' if b.flagged else ''}"
                      f"{html.escape(b.line())}</div>" for b in bands.values())
    plots = [
        _plot(shown, COL_N_IMAGES, "Images per night (rows: scored + error; cells in --fields runs)", "images"),
        _plot(shown, COL_POS_RATE, "Predicted-Parasitized rate (of the cells scored)", "%", bands[COL_POS_RATE],
              [f[COL_POS_RATE].flagged for f in flags], percent=True),
        _plot(shown, COL_ERROR_RATE, "Error rate (error rows / images read)", "%", bands[COL_ERROR_RATE],
              [f[COL_ERROR_RATE].flagged for f in flags], percent=True),
        _plot(shown, COL_IMAGES_PER_S, "Throughput", "images/s"),
        _plot(shown, COL_N_SLIDES_POS, "Slides called Parasitized (the night's own cells, CALL_RULE)", "slides"),
    ]
    pos, neg = disputed(root, latest[COL_RUN_ID])
    cache: dict = {}
    pos_html, pos_notes = _cells_html(pos, cache)
    neg_html, neg_notes = _cells_html(neg, cache)
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in pos_notes + neg_notes)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return bands, f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>malaria-ray nights: {html.escape(storage.redact(root) or "")}</title>
<style>{STYLE}</style></head><body>
<h1>malaria-ray nights: {html.escape(storage.redact(root) or "")}</h1>
<p>{len(rows)} finished night(s); the last {len(shown)} shown. Generated {now}. Research use only.</p>
<h2>Latest night: drift</h2>{verdict}
<p class="note">Band: median &plusmn; max({k:g} &times; 1.4826 &times; MAD, floor) of the last {drift_nights} earlier
nights ({nt.DRIFT_MIN_NIGHTS} at least); the positive rate only against nights of the same model, threshold and kind
of cell. <code>score --alarm-drift</code> decides with the same function.</p>
<h2>Latest night: summary</h2>{_summary(latest)}
<h2>Night over night</h2>
<div class="plots">{"".join(f'<img src="{data_uri(p)}" alt="plot">' for p in plots)}</div>
{_table(shown, flags)}
<h2>Latest night: disputed cells</h2>
<p>The most confident calls each way: look at these first.</p>
<h3>Called {POSITIVE_CLASS}, highest P first</h3><div>{pos_html}</div>
<h3>Called {NEGATIVE_CLASS}, lowest P first</h3><div>{neg_html}</div>
{notes}
</body></html>
"""


def write(root: str, out: str | None = None, **kw) -> tuple[str, dict[str, nt.Band]]:
    """Render and write the page (default ``root/report.html``, local or s3://); (where, the latest bands)."""
    out = out or storage.join(root, REPORT_FILE)
    bands, page = render(root, **kw)
    storage.write_bytes(out, page.encode())
    return out, bands
