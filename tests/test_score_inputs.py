"""Scoring inputs and output contract without Ray or TensorFlow: listing, archive streaming,
bad images as error rows, streaming metrics, and the commit protocol seen by three readers."""

from __future__ import annotations

import io
import os
import pathlib
import tarfile
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from malaria_ray import ingest, listing, schema, sources, storage
from malaria_ray.ingest import image_id_of, prepare_batch, read_and_prepare, read_raw
from malaria_ray.schema import STATUS_ALREADY


def real_pngs(sample_dir: pathlib.Path, cls: str, n: int) -> list[pathlib.Path]:
    return sorted((sample_dir / cls).glob("*.png"))[:n]


def png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def bad_inputs(sample_dir: pathlib.Path) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, decodes): the issue's bad-input list as real files."""
    good = real_pngs(sample_dir, "Parasitized", 1)[0].read_bytes()
    rgb = Image.open(io.BytesIO(good)).convert("RGB")
    gray16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # 16-bit PNG on save
    bomb = Image.new("1", (10_000, 10_000))  # 100 Mpx, a few KB as PNG
    return {
        "corrupt.png": (good[:40] + os.urandom(200), False),
        "truncated.png": (good[: len(good) // 2], False),
        "zero.png": (b"", False),
        "text.png": (b"this is not an image\n", False),
        "bomb.png": (png_bytes(bomb), False),
        "gray.png": (png_bytes(rgb.convert("L")), True),
        "rgba.png": (png_bytes(rgb.convert("RGBA")), True),
        "sixteen.png": (png_bytes(gray16), True),
        "cmyk.jpg": (png_bytes(rgb.convert("CMYK"), "JPEG"), True),
        "ünïcode name with spaces.png": (good, True),
    }


def raw_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return sources.rows_to_batch(rows)


def test_bad_images_become_error_rows_or_decode(sample_dir):
    cases = bad_inputs(sample_dir)
    rows = [sources._row(f"/x/Uninfected/{name}", schema.STATUS_OK, data=data) for name, (data, _) in cases.items()]
    out = prepare_batch(raw_batch(rows), image_size=32, skip_ids=np.array([], dtype=object))
    assert out["pixels"].shape == (len(cases), 32, 32, 3) and out["pixels"].dtype == np.uint8
    for i, (name, (data, decodes)) in enumerate(cases.items()):
        assert out[schema.COL_IMAGE_ID][i] == image_id_of(data, "")  # content hash, even for bad bytes
        assert out[schema.COL_LABEL][i] == "Uninfected"
        if decodes:
            assert out[schema.COL_STATUS][i] == schema.STATUS_OK, name
            assert out[schema.COL_ERROR][i] is None and out["pixels"][i].max() > 0, name
        else:
            assert out[schema.COL_STATUS][i] == schema.STATUS_ERROR, name
            assert out[schema.COL_ERROR][i], name
    assert "decompression bomb" in out[schema.COL_ERROR][list(cases).index("bomb.png")]
    assert "empty" in out[schema.COL_ERROR][list(cases).index("zero.png")]


def test_prepare_batch_identity_and_skip(sample_dir):
    path = real_pngs(sample_dir, "Parasitized", 1)[0]
    data = path.read_bytes()
    rows = [sources._row(str(path), schema.STATUS_OK, data=data),
            sources._row("/x/Thumbs.db", schema.STATUS_NON_IMAGE)]
    out = prepare_batch(raw_batch(rows), 32, skip_ids=np.array([image_id_of(data, "")], dtype=object))
    assert out[schema.COL_STATUS].tolist() == [STATUS_ALREADY, schema.STATUS_NON_IMAGE]
    assert out[schema.COL_SLIDE][0] == path.name.split("_IMG_")[0]
    assert out[schema.COL_PATIENT][0].startswith("P") and out[schema.COL_LABEL][0] == "Parasitized"


def make_mixed_input(sample_dir: pathlib.Path, root: pathlib.Path) -> dict[str, int]:
    """Loose images, a tar and a zip with a corrupt member each, a Parquet of bytes, empty
    archives and non-images in one tree. Returns the expected counts."""
    para, unin = real_pngs(sample_dir, "Parasitized", 12), real_pngs(sample_dir, "Uninfected", 12)
    (root / "loose" / "Parasitized").mkdir(parents=True)
    for p in para[:4]:
        (root / "loose" / "Parasitized" / p.name).write_bytes(p.read_bytes())
    (root / "loose" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (root / "loose" / "notes.txt").write_text("not an image")
    (root / "_staging").mkdir()
    (root / "_staging" / "ignored.png").write_bytes(b"ignored: hidden folder")
    with tarfile.open(root / "shard-0.tar", "w") as tar:
        for p in para[4:8] + unin[:4]:
            tar.add(p, arcname=f"cells/{'Parasitized' if p in para else 'Uninfected'}/{p.name}")
        info = tarfile.TarInfo("cells/Uninfected/corrupt member.png")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"\x89PNG\r\n\x1a\nxx"))
        info = tarfile.TarInfo("cells/readme.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with zipfile.ZipFile(root / "cell_images.zip", "w") as zf:
        for p in para[8:12] + unin[4:8]:
            zf.write(p, f"cell_images/{'Parasitized' if p in para else 'Uninfected'}/{p.name}")
        zf.writestr("cell_images/Uninfected/broken.png", b"GIF89a-but-not-really")
        zf.writestr("cell_images/Uninfected/Thumbs.db", b"\x00\x01")
    tarfile.open(root / "empty.tar", "w").close()
    zipfile.ZipFile(root / "empty.zip", "w").close()
    table = pa.table({"path": [f"Uninfected/{p.name}" for p in unin[8:12]],
                      "image": [p.read_bytes() for p in unin[8:12]]})
    (root / "pq").mkdir()
    pq.write_table(table, root / "pq" / "part-0.parquet")
    # images: 4 loose + 9 tar + 9 zip + 4 parquet = 26, of which 2 corrupt members
    return {"images": 26, "errors": 2, "non_image_loose": 2, "non_image_members": 2, "empty": 2}


def test_list_and_expand_mixed_input(sample_dir, tmp_path):
    expected = make_mixed_input(sample_dir, tmp_path)
    listing = sources.list_units(str(tmp_path))
    assert listing.count("image") == 4 and listing.count("tar") == 2 and listing.count("zip") == 2
    assert listing.count("parquet") == 1
    assert sorted(os.path.basename(p) for p in listing.skipped) == ["Thumbs.db", "notes.txt"]
    rows = [r for u in listing.table.to_pylist() for r in sources.expand_unit(u)]
    by = lambda s: [r for r in rows if r[schema.COL_STATUS] == s]  # noqa: E731
    assert len(by("ok")) + len(by("error")) == expected["images"]
    assert len(by("non_image")) == expected["non_image_members"]
    assert len(by("empty_archive")) == expected["empty"]
    assert len(rows) == len({r[schema.COL_URI] for r in rows})  # every member has its own uri
    out = prepare_batch(raw_batch(rows), 32, np.array([], dtype=object))
    errors = [u for u, s in zip(out[schema.COL_URI], out[schema.COL_STATUS]) if s == "error"]
    assert sorted(e.rsplit("/", 1)[1] for e in errors) == ["broken.png", "corrupt member.png"]
    labels = [lab for lab, s in zip(out[schema.COL_LABEL], out[schema.COL_STATUS]) if s == "ok"]
    assert labels.count("Parasitized") == 12 and labels.count("Uninfected") == 12
    # The pipeline's read task does the same in batches of 5: the same rows, in the same order.
    units = {k: np.array(listing.table.column(k).to_pylist(), dtype=object) for k in ("kind", "uri")}
    batches = list(read_and_prepare(units, 32, ingest.NO_IDS, batch_size=5))
    assert [len(b[schema.COL_URI]) for b in batches] == [min(5, len(rows) - i) for i in range(0, len(rows), 5)]
    assert np.concatenate([b[schema.COL_URI] for b in batches]).tolist() == out[schema.COL_URI].tolist()
    assert np.array_equal(np.concatenate([b["pixels"] for b in batches]), out["pixels"])
    # Scoring's read stage: the same rows as raw Arrow batches (loose files fetched 3 at a time),
    # then decoded batch by batch: identical outputs, typed columns even where all null.
    raw = list(read_raw(units, batch_size=5, threads=3))
    assert all(t.schema == sources.RAW_SCHEMA for t in raw)
    assert [t.num_rows for t in raw] == [len(b[schema.COL_URI]) for b in batches]
    decoded = [prepare_batch({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}, 32,
                             ingest.NO_IDS) for t in raw]
    for got, want in zip(decoded, batches):
        assert got[schema.COL_URI].tolist() == want[schema.COL_URI].tolist()
        assert got[schema.COL_LABEL].tolist() == want[schema.COL_LABEL].tolist()
        assert np.array_equal(got["pixels"], want["pixels"])


def test_truncated_tar_keeps_read_members_and_reports(sample_dir, tmp_path):
    pngs = real_pngs(sample_dir, "Uninfected", 3)
    with tarfile.open(tmp_path / "t.tar", "w", format=tarfile.USTAR_FORMAT) as tar:  # no PAX headers
        for p in pngs:
            tar.add(p, arcname=p.name)
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: 512 + pngs[0].stat().st_size + 1000])  # cut inside member 2
    rows = list(sources.expand_unit({"kind": "tar", "uri": str(tmp_path / "t.tar")}))
    statuses = [r[schema.COL_STATUS] for r in rows]
    assert statuses[0] == "ok" and statuses[-1] == "error" and len(rows) <= 3
    assert list(sources.expand_unit({"kind": "zip", "uri": str(tmp_path / "t.tar")}))[0][schema.COL_STATUS] == "error"


def test_s3_listing_streams_pages_in_sorted_order(moto_s3, tmp_path):
    """The S3 listing reads ListObjectsV2 page by page (3 keys a page here) and yields exactly the
    objects a local copy of the same tree lists, in the same order: no folder markers, nothing
    from a sibling prefix, hidden folders pruned, unicode and spaces sorted as Python sorts."""
    import boto3

    names = ["B/x.png", "a b/c.png", "a/z.png", "a/é.png", "a/日本.png", "a/deep/er/1.tar",
             "a/Thumbs.db", "_staging/y.png", "a/.hidden/q.png", "b.zip", "p/part-0.parquet"]
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="listing")
    fs, _ = storage.filesystem("s3://listing")
    for name in names:
        fs.pipe(f"listing/in/{name}", b"x")
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    fs.pipe("listing/in/a/marker/", b"")  # a console-made "folder"
    fs.pipe("listing/in-2/elsewhere.png", b"x")  # shares the prefix string, not the folder

    paged = [p for p, _version in listing._list_s3(fs, "listing/in", page_size=3)]
    assert paged == sorted(p for p in fs.find("listing/in") if not p.endswith("/"))
    assert all(v.startswith("1:") for _, v in listing._list_s3(fs, "listing/in"))  # size:ETag
    assert len(paged) == len(names)
    s3 = sources.list_units("s3://listing/in")
    local = sources.list_units(str(tmp_path))
    strip = lambda uris, base: [u[len(base):] for u in uris]  # noqa: E731
    assert s3.table.column("kind").to_pylist() == local.table.column("kind").to_pylist()
    assert strip(s3.table.column("uri").to_pylist(), "s3://listing/in") == \
        strip(local.table.column("uri").to_pylist(), str(tmp_path))
    assert strip(s3.skipped, "s3://listing/in") == ["/a/Thumbs.db"]
    assert len(s3) == 8 and sources.list_units("s3://listing").count("image") == 6


def test_missing_input_is_a_clear_error(tmp_path):
    from malaria_ray.corpus import CorpusError

    with pytest.raises(CorpusError, match="does not exist"):
        sources.list_units(str(tmp_path / "nope"))


def _rows(unit_kind: str, uri: str) -> list[dict]:
    return list(sources.expand_unit({"kind": unit_kind, "uri": uri}))


@pytest.fixture
def ordinary_tree(sample_dir, tmp_path) -> pathlib.Path:
    """A folder as a lab's tools leave it: class folders, a hidden and a private folder, a text file,
    a symbolic and a hard link to images."""
    root = tmp_path / "tree"
    for cls in ("Parasitized", "Uninfected"):
        (root / cls).mkdir(parents=True)
        for p in real_pngs(sample_dir, cls, 2):
            (root / cls / p.name).write_bytes(p.read_bytes())
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "t.png").write_bytes(real_pngs(sample_dir, "Uninfected", 1)[0].read_bytes())
    (root / "_private").mkdir()
    (root / "_private" / "p.png").write_bytes(real_pngs(sample_dir, "Uninfected", 1)[0].read_bytes())
    (root / "notes.txt").write_text("counted, not scored\n")
    first = sorted((root / "Parasitized").iterdir())[0]
    (root / "Parasitized" / "zz-symlink.png").symlink_to(first.name)
    os.link(first, root / "Parasitized" / "zz-hardlink.png")
    return root


def test_tar_made_with_tar_c_dir_dot_accounts_for_every_entry(ordinary_tree, tmp_path):
    """`tar -C DIR -cf x.tar .` names members ./a/b.png (it was reported as an empty archive);
    links, hidden and private members were skipped uncounted. Every entry now has one row."""
    import subprocess

    tar = tmp_path / "x.tar"
    subprocess.run(["tar", "-C", str(ordinary_tree), "-cf", str(tar), "."], check=True)
    listed = [line for line in subprocess.run(["tar", "-tvf", str(tar)], capture_output=True, text=True,
                                              check=True).stdout.splitlines() if not line.startswith("d")]
    rows = _rows("tar", str(tar))
    assert len(rows) == len(listed) == 9, (rows, listed)
    status = {r["uri"].split("#", 1)[1]: r["status"] for r in rows}
    assert all(not name.startswith("./") for name in status), status
    assert status["notes.txt"] == schema.STATUS_NON_IMAGE
    assert status[".thumbs/t.png"] == status["_private/p.png"] == schema.STATUS_HIDDEN
    assert status["Parasitized/zz-symlink.png"] == schema.STATUS_ERROR
    # GNU tar stores the second path of a hard-linked file as a link member: one of the pair.
    linked = [r for r in rows if r["status"] == schema.STATUS_ERROR]
    assert len(linked) == 2 and all("links in archives are not followed" in r["error"] for r in linked)
    assert sum(r["status"] == schema.STATUS_OK for r in rows) == 4
    batch = prepare_batch(raw_batch(rows), 32)
    ok = batch[schema.COL_STATUS] == schema.STATUS_OK
    assert set(batch[schema.COL_LABEL][ok]) == {"Parasitized", "Uninfected"}


def test_zip_duplicate_and_hidden_members_are_counted(sample_dir, tmp_path):
    png = real_pngs(sample_dir, "Parasitized", 1)[0].read_bytes()
    path = tmp_path / "dup.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("Parasitized/a.png", png)
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("Parasitized/a.png", png)
        zf.writestr("__MACOSX/Parasitized/._a.png", b"resource fork")
        zf.writestr("./Uninfected/b.png", png)
    status = [(r["uri"].split("#", 1)[1], r["status"]) for r in _rows("zip", str(path))]
    assert status == [("Parasitized/a.png", schema.STATUS_OK), ("Parasitized/a.png", schema.STATUS_DUPLICATE),
                      ("__MACOSX/Parasitized/._a.png", schema.STATUS_HIDDEN), ("Uninfected/b.png", schema.STATUS_OK)]


def test_a_hash_in_a_loose_path_keeps_label_and_identity(sample_dir, tmp_path):
    src = real_pngs(sample_dir, "Parasitized", 1)[0]
    folder = tmp_path / "night #3" / "Parasitized"
    folder.mkdir(parents=True)
    (folder / src.name).write_bytes(src.read_bytes())
    listing = sources.list_units(str(tmp_path))
    out = prepare_batch(raw_batch([r for u in listing.table.to_pylist() for r in sources.expand_unit(u)]), 32)
    assert out[schema.COL_STATUS].tolist() == [schema.STATUS_OK]
    assert out[schema.COL_LABEL][0] == "Parasitized"
    assert out[schema.COL_PATIENT][0] is not None and out[schema.COL_PATIENT][0].startswith("P")
    assert schema.split_member_uri(out[schema.COL_URI][0]) == (out[schema.COL_URI][0], None)
    assert schema.split_member_uri("s3://b/x.tar#a#b.png") == ("s3://b/x.tar", "a#b.png")


def test_a_file_name_that_is_not_utf8_is_an_error_row_not_a_failed_run(sample_dir, tmp_path):
    png = real_pngs(sample_dir, "Parasitized", 1)[0].read_bytes()
    (tmp_path / "Parasitized").mkdir()
    (tmp_path / "Parasitized" / "good.png").write_bytes(png)
    with open(os.path.join(os.fsencode(tmp_path), b"Parasitized", b"caf\xe9-latin1.png"), "wb") as f:
        f.write(png)
    listing = sources.list_units(str(tmp_path))
    assert listing.count(sources.KIND_BAD_NAME) == 1 and listing.count(sources.KIND_IMAGE) == 1
    rows = [r for u in listing.table.to_pylist() for r in sources.expand_unit(u)]
    bad = [r for r in rows if r["status"] == schema.STATUS_ERROR]
    assert len(bad) == 1 and "not valid UTF-8" in bad[0]["error"] and "\\xe9" in bad[0]["uri"]
    pa.table(raw_batch(rows))  # every value fits an Arrow string column: the run cannot fail on it


def test_label_comes_only_from_the_images_folder_or_the_one_above():
    from malaria_ray import corpus

    assert corpus.label_of("night/Parasitized/a.png") == "Parasitized"
    assert corpus.label_of("night/Uninfected/slide-7/a.png") == "Uninfected"
    assert corpus.label_of("Parasitized/2026/11/night/a.png") is None  # far above: not a label
    assert corpus.label_of("x.tar#Parasitized/a.png".split("#")[1]) == "Parasitized"


def test_slide_and_patient_beyond_nih_names():
    from malaria_ray import corpus

    assert corpus.describe("/in/slide-17/cell-001.png") == (None, "slide-17", None)
    assert corpus.describe("/in/slide-17/Parasitized/cell-001.png") == ("Parasitized", "slide-17", None)
    assert corpus.describe("/in/slide-18.tar#cell-001.png") == (None, "slide-18", None)
    assert corpus.describe("/in/night.zip#S9/Uninfected/c.png") == ("Uninfected", "S9", None)
    nih = "/in/x/C33P1thinF_IMG_20150619_114756a_cell_179.png"
    assert corpus.describe(nih)[1:] == ("C33P1thinF", "P1")  # NIH tokens win over folders
    assert corpus.describe(nih, None, "S-given", "P-given") == (None, "S-given", "P-given")  # the input's own columns


def test_parquet_inputs_bring_their_own_slide_and_patient(sample_dir, tmp_path):
    png = real_pngs(sample_dir, "Uninfected", 1)[0].read_bytes()
    path = tmp_path / "cells.parquet"
    pq.write_table(pa.table({"image": [png, png], "path": ["a.png", "b.png"], "slide_id": ["S1", "S2"],
                             "patient_id": ["Q1", None], "label": ["Uninfected", None]}), path)
    out = prepare_batch(raw_batch(_rows("parquet", str(path))), 32)
    assert out[schema.COL_SLIDE].tolist() == ["S1", "S2"]
    assert out[schema.COL_PATIENT].tolist() == ["Q1", None]
    assert out[schema.COL_LABEL].tolist() == ["Uninfected", None]


def test_identity_manifest_loads_and_refuses_bad_ones(tmp_path):
    from malaria_ray.config import ConfigError

    good = tmp_path / "m.csv"
    good.write_text("path,slide_id,patient_id,label\nday1/a.png,S1,P7,Parasitized\n"
                    "shard.tar#b.png,S2,P8,\ns3://b/c.png,S3,,Uninfected\n")
    m = sources.load_manifest(str(good), str(tmp_path / "in"))
    assert m[str(tmp_path / "in" / "day1" / "a.png")] == ("S1", "P7", "Parasitized")
    assert m[str(tmp_path / "in" / "shard.tar#b.png")] == ("S2", "P8", None)
    assert m["s3://b/c.png"] == ("S3", None, "Uninfected")
    (tmp_path / "bad.csv").write_text("path,slide_id,patient_id,label\na.png,S1,P1,malaria\n")
    with pytest.raises(ConfigError, match="label must be one of"):
        sources.load_manifest(str(tmp_path / "bad.csv"), str(tmp_path))
    (tmp_path / "cols.csv").write_text("file,slide\na.png,S1\n")
    with pytest.raises(ConfigError, match="lacks column"):
        sources.load_manifest(str(tmp_path / "cols.csv"), str(tmp_path))


def test_archive_members_over_the_caps_are_error_rows_not_reads(sample_dir, tmp_path):
    """A zip bomb (tiny packed, huge unpacked) and an oversized tar member are refused from their
    headers: error rows, and not one of their bytes is decompressed."""
    import subprocess

    png = real_pngs(sample_dir, "Parasitized", 1)[0].read_bytes()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Parasitized/ok.png", png)
        zf.writestr("Parasitized/bomb.png", b"\0" * (80 * 2**20))  # 80 MiB of zeros packs to ~80 KB
    limits = sources.Limits(member_bytes=64 * 2**20, compression_ratio=100)
    rows = {r["uri"].split("#")[1]: r for r in sources.expand_unit({"kind": "zip", "uri": str(bomb)}, limits=limits)}
    assert rows["Parasitized/ok.png"]["status"] == schema.STATUS_OK
    assert rows["Parasitized/bomb.png"]["status"] == schema.STATUS_ERROR and rows["Parasitized/bomb.png"]["data"] is None
    assert "--max-member-mb" in rows["Parasitized/bomb.png"]["error"]
    small = sources.Limits(member_bytes=2**30, compression_ratio=100)
    rows = {r["uri"].split("#")[1]: r for r in sources.expand_unit({"kind": "zip", "uri": str(bomb)}, limits=small)}
    assert "--max-compression-ratio" in rows["Parasitized/bomb.png"]["error"]
    big = tmp_path / "big"
    (big / "Uninfected").mkdir(parents=True)
    (big / "Uninfected" / "huge.png").write_bytes(os.urandom(3 * 2**20))
    (big / "Uninfected" / "ok.png").write_bytes(png)
    subprocess.run(["tar", "-C", str(big), "-czf", str(tmp_path / "big.tar.gz"), "Uninfected"], check=True)
    rows = {r["uri"].split("#")[1]: r for r in sources.expand_unit(
        {"kind": "tar", "uri": str(tmp_path / "big.tar.gz")}, limits=sources.Limits(member_bytes=2**20))}
    assert rows["Uninfected/huge.png"]["status"] == schema.STATUS_ERROR and "3.0 MiB" in rows["Uninfected/huge.png"]["error"]
    assert rows["Uninfected/ok.png"]["status"] == schema.STATUS_OK


def test_slices_in_multiples_of_the_batch():
    """Every read slice but the last holds a multiple of the batch; without one, near-equal slices."""
    table = pa.table({"i": list(range(1000))})
    sizes = [len(t) for t in ingest.slices(table, 4, 64)]
    assert sizes == [256, 256, 256, 232] and all(n % 64 == 0 for n in sizes[:-1])
    assert [len(t) for t in ingest.slices(table, 4)] == [250, 250, 250, 250]
    assert [len(t) for t in ingest.slices(pa.table({"i": list(range(10))}), 4, 64)] == [10]
    assert [t.column("i").to_pylist() for t in ingest.slices(pa.table({"i": list(range(5))}), 8, 2)] == [
        [0, 1], [2, 3], [4]]
    assert [len(t) for t in ingest.slices(pa.table({"i": pa.array([], pa.int64())}), 4, 64)] == [0]  # all skipped


def test_a_manifest_decides_identity_in_the_decode_task(sample_dir, tmp_path):
    """--manifest identities reach ``prepare_batch`` (where scoring decides identity, once): its
    slide and patient win; its empty label leaves the image's own; other images keep their names'."""
    from malaria_ray import corpus

    pngs = real_pngs(sample_dir, "Parasitized", 2)
    for p in pngs:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    uris = [str(tmp_path / p.name) for p in pngs]
    known = corpus.Identities.from_manifest({uris[0]: ("slide-7", "Q7", None)})
    out = prepare_batch(raw_batch([r for u in uris for r in _rows("image", u)]), 32, known=known)
    assert out[schema.COL_SLIDE].tolist()[0] == "slide-7" and out[schema.COL_PATIENT].tolist()[0] == "Q7"
    assert out[schema.COL_LABEL].tolist() == [None, None]  # no class folder above tmp_path, none in the manifest
    assert out[schema.COL_PATIENT].tolist()[1] == corpus.describe(uris[1])[2]
