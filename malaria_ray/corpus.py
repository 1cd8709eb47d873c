"""The cell-image corpus: listing, class from folder, patient/slide identity, splits.

NIH filenames start with a slide key followed by ``_IMG_`` (``C33P1thinF_IMG_..._cell_179.png``).
The patient is the ``P<n>`` token after the ``C<n>[letter]`` slide number (``C37BP2``,
``C51AP12``); patient P8 has two slide keys. Control slides have no ``P<n>`` token
(``C1_thinF``, ``C2NThinF``, ``C201ThinF``): each is its own identity, named by its C number.
Pure: imports neither Ray nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import re
from dataclasses import dataclass

import numpy as np

from malaria_ray import sources
from malaria_ray.config import CorpusError
from malaria_ray.schema import (
    CLASS_NAMES, COL_KIND, COL_LABEL_HINT, COL_PATIENT_HINT, COL_SLIDE_HINT, COL_STATUS, COL_URI, CONTAINER_SUFFIXES,
    STATUS_OK, path_within, split_member_uri,
)

_SLIDE_RE = re.compile(r"^(C\d+.*?)_IMG_", re.IGNORECASE)
_PATIENT_RE = re.compile(r"^C\d+[A-Z]?P(\d+)", re.IGNORECASE)
_CONTROL_RE = re.compile(r"^C(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Identity:
    slide_id: str | None
    patient_id: str | None


def parse_identity(name: str) -> Identity:
    """Slide and patient of an NIH cell filename (a bare name or a path); unknown -> None."""
    base = posixpath.basename(name.replace("\\", "/"))
    m = _SLIDE_RE.match(base)
    if not m:
        return Identity(None, None)
    slide = m.group(1)
    p = _PATIENT_RE.match(slide)
    if p:
        return Identity(slide, f"P{int(p.group(1))}")
    c = _CONTROL_RE.match(slide)
    return Identity(slide, f"C{int(c.group(1))}")


LABEL_LEVELS = 2  # the image's own folder and the one above it; a class folder higher up labels nothing


def label_of(path: str) -> str | None:
    """The class named by a ``Parasitized``/``Uninfected`` folder that holds the image directly
    (``Parasitized/cell.png``) or one level up (``Parasitized/slide-7/cell.png``). A class folder
    further up (``Parasitized/2026/11/night/cell.png``) does not label it: archives get copied
    under such names by accident, and a silent wrong label would poison the metrics."""
    parts = path.replace("\\", "/").split("/")[:-1]
    for part in reversed(parts[-LABEL_LEVELS:]):
        if part in CLASS_NAMES:
            return part
    return None


def folder_slide(path: str) -> str | None:
    """The slide of an image whose name carries none: its nearest folder that is not a class
    folder; for an archive member at the archive's top, the archive's file name (no suffix)."""
    container, member = split_member_uri(path)
    inner = (member if member is not None else container).replace("\\", "/").split("/")[:-1]
    for part in reversed(inner):
        if part and part not in CLASS_NAMES:
            return part
    if member is not None:
        name = posixpath.basename(container)
        for suffix in CONTAINER_SUFFIXES:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)] or None
    return None


def describe(uri: str, label_hint: str | None = None, slide_hint: str | None = None,
             patient_hint: str | None = None) -> tuple[str | None, str | None, str | None]:
    """(label, slide_id, patient_id) of one image, from the first source that has it:

    1. what the input carries itself (a Parquet input's ``label``/``slide_id``/``patient_id``);
    2. an NIH file name (``C33P1thinF_IMG_...``: slide and patient);
    3. folders: the label from a class folder (``label_of``), the slide from the nearest other
       folder (``folder_slide``); the patient stays unknown.

    A scoring ``--manifest`` overrides all of these (``identify``).
    """
    path = path_within(uri)
    ident = parse_identity(path)
    label = label_hint if label_hint in CLASS_NAMES else label_of(path)
    slide = slide_hint or ident.slide_id or folder_slide(uri)
    return label, slide, patient_hint or ident.patient_id


@dataclass(frozen=True)
class Identities:
    """Label, slide and patient decided before decoding, by uri (sorted arrays: a decode task looks
    an image up by binary search, and the arrays travel to it once): a training listing's, for every
    image, or a scoring ``--manifest``'s, whose empty label leaves the image its own."""

    uris: np.ndarray  # sorted str
    labels: np.ndarray  # object arrays, in ``uris`` order
    slides: np.ndarray
    patients: np.ndarray

    @classmethod
    def of(cls, uris, labels, slides, patients) -> "Identities":
        uris = np.asarray(uris, dtype=str)
        order = np.argsort(uris, kind="stable")
        return cls(uris[order], *(np.asarray(list(x), dtype=object)[order] for x in (labels, slides, patients)))

    @classmethod
    def from_manifest(cls, manifest: dict[str, tuple[str | None, str | None, str | None]]) -> "Identities":
        """``sources.load_manifest``'s {uri: (slide_id, patient_id, label)}."""
        return cls.of(list(manifest), [v[2] for v in manifest.values()], [v[0] for v in manifest.values()],
                      [v[1] for v in manifest.values()])

    def __len__(self) -> int:
        return len(self.uris)

    def get(self, uri: str) -> tuple[str | None, str | None, str | None] | None:
        """(label, slide_id, patient_id) of ``uri``, or None when it is not known here."""
        i = int(np.searchsorted(self.uris, uri))
        if i < len(self.uris) and self.uris[i] == uri:
            return self.labels[i], self.slides[i], self.patients[i]
        return None


def identify(uri: str, known: Identities | None, label_hint: str | None = None, slide_hint: str | None = None,
             patient_hint: str | None = None) -> tuple[str | None, str | None, str | None]:
    """(label, slide_id, patient_id) of one image: what ``known`` says (a training listing, a
    ``--manifest``: its slide and patient win, and its label where it has one), else ``describe``."""
    found = known.get(uri) if known is not None else None
    if found is not None and found[0] is not None:
        return found
    label, slide, patient = describe(uri, label_hint, slide_hint, patient_hint)
    return (label, slide, patient) if found is None else (label, found[1], found[2])


@dataclass(frozen=True)
class Listing:
    uris: list[str]
    labels: list[str]
    slide_ids: list[str | None]
    patient_ids: list[str | None]
    skipped: list[str]  # files under class folders that are not images (or not readable as listed)
    units: object = None  # the ``sources`` units (Arrow table: kind, uri) the images come from

    def __len__(self) -> int:
        return len(self.uris)

    def identities(self) -> Identities:
        """The label and identity decided for every listed image (by ``describe``, once)."""
        return Identities.of(self.uris, self.labels, self.slide_ids, self.patient_ids)

    def subset(self, idx: np.ndarray | list[int]) -> "Listing":
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return dataclasses.replace(
            self, uris=pick(self.uris), labels=pick(self.labels),
            slide_ids=pick(self.slide_ids), patient_ids=pick(self.patient_ids),
        )


def list_corpus(data_uri: str) -> Listing:
    """Every image under ``Parasitized/`` and ``Uninfected/`` folders below ``data_uri``, sorted.

    Lists with ``sources`` as scoring does, so a corpus may be loose files, tar/zip shards or
    Parquet files (a ``label`` column, or class folders in member names); archive members are named
    without reading their bytes. Files outside class folders are ignored; non-image files inside
    them are counted in ``skipped``.
    """
    units = sources.list_units(data_uri)
    rows, skipped = [], [u for u in units.skipped if label_of(u) is not None]
    for kind, uri in zip(units.table.column(COL_KIND).to_pylist(), units.table.column(COL_URI).to_pylist()):
        for row in sources.expand_unit({COL_KIND: kind, COL_URI: uri}, with_data=False):
            label, slide, patient = describe(row[COL_URI], row[COL_LABEL_HINT], row[COL_SLIDE_HINT], row[COL_PATIENT_HINT])
            if label is None:
                continue
            if row[COL_STATUS] != STATUS_OK:
                skipped.append(row[COL_URI])
                continue
            rows.append((row[COL_URI], label, slide, patient))
    missing = [c for c in CLASS_NAMES if not any(r[1] == c for r in rows)]
    if missing:
        raise CorpusError(
            f"{data_uri} has no images under {' or '.join(m + '/' for m in missing)}: "
            f"a corpus needs both class folders ({', '.join(CLASS_NAMES)})"
        )
    return Listing(
        uris=[r[0] for r in rows], labels=[r[1] for r in rows],
        slide_ids=[r[2] for r in rows], patient_ids=[r[3] for r in rows], skipped=skipped,
        units=units.table,
    )


def stable_subsample(listing: Listing, n: int, seed: int) -> Listing:
    """A class-balanced, deterministic subset of ``n`` images (for --max-images)."""
    if n >= len(listing):
        return listing
    rng = np.random.default_rng(seed)
    labels = np.asarray(listing.labels)
    keep: list[int] = []
    for i, cls in enumerate(CLASS_NAMES):
        idx = np.flatnonzero(labels == cls)
        take = n // 2 + (n % 2 if i == 0 else 0)
        keep.extend(rng.permutation(idx)[: min(take, len(idx))].tolist())
    return listing.subset(sorted(keep))


def group_keys(listing: Listing) -> list[str]:
    """Patient id, or the file's own uri where the name carries no identity."""
    return [p if p is not None else f"uri:{u}" for p, u in zip(listing.patient_ids, listing.uris)]


def split_patient(listing: Listing, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation images: whole patients, stratified, deterministic for ``seed``.

    Patients are stratified by whether they contribute Parasitized cells (infected patients
    vs. uninfected controls) and, within each stratum, assigned to validation in a seeded
    order until the stratum's image share reaches ``val_fraction``.
    """
    groups = np.asarray(group_keys(listing))
    labels = np.asarray(listing.labels)
    uniq = sorted(set(groups.tolist()))
    infected = {g for g in uniq if np.any(labels[groups == g] == CLASS_NAMES[0])}
    val_groups: set[str] = set()
    for stratum in (sorted(infected), sorted(set(uniq) - infected)):
        if not stratum:
            continue
        order = sorted(stratum, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        sizes = {g: int(np.sum(groups == g)) for g in stratum}
        total = sum(sizes.values())
        taken = 0
        for g in order:
            if taken >= val_fraction * total:
                break
            # Take the group if it brings the share closer to the target than skipping it.
            if abs(taken + sizes[g] - val_fraction * total) <= abs(taken - val_fraction * total) or not taken:
                val_groups.add(g)
                taken += sizes[g]
    mask = np.isin(groups, list(val_groups))
    train_groups, val_set = set(groups[~mask].tolist()), set(groups[mask].tolist())
    assert not (train_groups & val_set), "a patient is on both sides of the split"
    if mask.all() or not mask.any():
        raise CorpusError("too few patients to split: need at least two identities per side")
    return mask


def split_random(listing: Listing, val_fraction: float, seed: int) -> np.ndarray:
    """The notebook's image-level split (patients leak across sides; kept for comparison)."""
    n = len(listing)
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(val_fraction * n))]] = True
    return mask


def make_split(listing: Listing, how: str, val_fraction: float, seed: int) -> np.ndarray:
    return (split_patient if how == "patient" else split_random)(listing, val_fraction, seed)


def class_weights(listing: Listing, val_mask: np.ndarray, how: str) -> list[float]:
    """The training loss's weight per class, in ``CLASS_NAMES`` order, from the training part's counts.

    ``balanced``: n / (2 n_c), so each class carries half the loss and the mean weight over the
    training images is 1 (scikit-learn's ``class_weight="balanced"``); ``none``: 1 each. A class
    with no training image keeps weight 1 (training then cannot learn it either way).
    """
    if how == "none":
        return [1.0] * len(CLASS_NAMES)
    labels = [lab for lab, v in zip(listing.labels, val_mask) if not v]
    counts = [labels.count(name) for name in CLASS_NAMES]
    return [len(labels) / (len(CLASS_NAMES) * c) if c else 1.0 for c in counts]
