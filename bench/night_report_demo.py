"""Not a benchmark: the nights behind docs/img/night-report.png, the README's picture of
`malaria-ray report`. Twelve real scoring nights of NIH cells on one output root (one local Ray
for all of them, through `malaria-ray score`'s own entry), the last with far more Parasitized
cells than the others (the drift flag), then the report and a screenshot in headless Chromium.

    flock /tmp/malaria-ray-ray.lock python bench/night_report_demo.py --cells /work/shared/data/nih_malaria \\
        --model RUN_DIR --work /tmp/night-demo --png docs/img/night-report.png

Nights 3 and 8 are unlabelled (no class folders), night 5 carries three undecodable files.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import random
import shutil
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", required=True, help="a corpus with Parasitized/ and Uninfected/ (NIH cells)")
    p.add_argument("--model", required=True, help="a trained run directory (its model.json names the operating point)")
    p.add_argument("--work", required=True, help="a folder for the nights' inputs and the output root")
    p.add_argument("--png", required=True, help="the screenshot to write")
    p.add_argument("--nights", type=int, default=12)
    p.add_argument("--per-night", type=int, default=200)
    args = p.parse_args()

    import ray
    from PIL import Image

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    import cdp

    from malaria_ray import cli

    cells, work, rng = pathlib.Path(args.cells), pathlib.Path(args.work), random.Random(7)
    pos, neg = sorted((cells / "Parasitized").glob("*.png")), sorted((cells / "Uninfected").glob("*.png"))
    rng.shuffle(pos)
    rng.shuffle(neg)
    root = work / "root"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        for night in range(1, args.nights + 1):
            share = 0.45 if night == args.nights else rng.uniform(0.08, 0.14)
            n_pos = round(share * args.per_night)
            folder = work / f"night-{night:02d}"
            for src in [pos.pop() for _ in range(n_pos)] + [neg.pop() for _ in range(args.per_night - n_pos)]:
                dest = folder if night in (3, 8) else folder / src.parent.name
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest / src.name)
            for j in range(3 if night == 5 else 0):
                (folder / f"scanner_glitch_{j}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
            code = cli.main(["score", "--input", str(folder), "--model", args.model, "--output", str(root),
                             "--run-id", f"night-{night:02d}", "--alarm-drift", "4", "--max-error-fraction", "0.05"])
            print(f"night {night}: exit {code}", flush=True)
    finally:
        ray.shutdown()
    assert cli.main(["report", str(root)]) == 0
    with cdp.Page(width=1100, height=900) as page:
        page.load(root / "report.html")
        assert not page.errors, page.errors
        png = page.screenshot(work / "full.png")
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    shot = shot.crop((0, 0, shot.width, min(shot.height, 2600)))
    shot = shot.resize((shot.width * 7 // 10, shot.height * 7 // 10), Image.LANCZOS).quantize(colors=128)
    shot.save(args.png, optimize=True)
    print(f"wrote {args.png}: {pathlib.Path(args.png).stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
