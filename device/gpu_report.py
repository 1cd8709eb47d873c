"""The table device/gpu_run.sh ends with: each scoring job's images/s against the bare model's.

    python device/gpu_report.py OUT --batch 1024

Reads what gpu_run.sh left in OUT: ``score-{fp32,bf16}.log`` (the CLI's end-of-run summary, whose
throughput line is the job's own count over its own seconds), ``bare.json`` (bench/gpu_ceiling.py),
``phases.txt`` and, on a GPU, ``nvidia-smi.csv``. The ratio compares a job with the bare model fed
from host memory at the same precision and batch, which is what a scoring actor can at best reach.
Stdlib only: it runs beside the carry.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

THROUGHPUT = re.compile(r"throughput\s+([\d,.]+) images/s over ([\d.]+) s")
SCORED = re.compile(r"images scored\s+([\d,]+)")


def job_rate(log: str) -> tuple[float, float, int]:
    """(images/s, seconds, images scored) from a ``malaria-ray score`` summary."""
    rate, seconds = THROUGHPUT.search(log).groups()
    return float(rate.replace(",", "")), float(seconds), int(SCORED.search(log).group(1).replace(",", ""))


def phases(text: str) -> dict[str, tuple[float, float]]:
    """{phase: (start, end)} from ``phases.txt`` lines ``NAME start|end EPOCH``."""
    spans: dict[str, list[float]] = {}
    for line in text.splitlines():
        name, edge, t = line.split()
        spans.setdefault(name, [0.0, 0.0])[edge == "end"] = float(t)
    return {k: (v[0], v[1]) for k, v in spans.items()}


def utilisation(csv: str, start: float, end: float) -> float | None:
    """Mean GPU utilisation (%) of nvidia-smi's samples between ``start`` and ``end``."""
    values = []
    for line in csv.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            if start <= t <= end:
                values.append(float(parts[1]))
        except (ValueError, IndexError):
            continue
    return sum(values) / len(values) if values else None


def report(out: Path, batch: int) -> list[str]:
    bare = {r["phase"]: r for r in json.loads((out / "bare.json").read_text())}
    spans = phases((out / "phases.txt").read_text())
    smi = (out / "nvidia-smi.csv").read_text() if (out / "nvidia-smi.csv").exists() else ""
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "no GPU (dry run)"

    def util(start: float, end: float) -> str:
        u = utilisation(smi, start, end) if smi else None
        return f"{u:.0f}%" if u is not None else "-"

    lines = [f"== score --backend jax on {gpu}", "| phase | images/s | ratio | GPU util |", "|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        rate, seconds, scored = job_rate((out / f"score-{precision}.log").read_text())
        host = bare[f"infer-{precision}-host-b{batch}"]
        lines.append(f"| score {precision}, {scored:,} images, {seconds:.1f} s | {rate:,.0f} | "
                     f"{rate / host['images_per_s']:.2f}x bare {precision} host | {util(*spans[f'score-{precision}'])} |")
    for name, r in bare.items():
        lines.append(f"| bare {name} | {r['images_per_s']:,.0f} | | {util(r['t0'], r['t1'])} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch", type=int, required=True)
    args = ap.parse_args(argv)
    print("\n".join(report(args.out, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
