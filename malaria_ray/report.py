"""Plots (the notebook's curves and confusion-matrix heatmap) and one-screen summaries."""

from __future__ import annotations

import io

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: clusters and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def curves_png(history: dict[str, list[float]]) -> bytes:
    """Loss and accuracy per epoch for train and validation, as the notebook's ggplot figure."""
    plt = _pyplot()
    with plt.style.context("ggplot"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        epochs = np.arange(1, len(history["loss"]) + 1)
        for key, label in (("loss", "train_loss"), ("val_loss", "val_loss"),
                           ("accuracy", "train_acc"), ("val_accuracy", "val_acc")):
            ax.plot(epochs, history[key], marker="o", ms=3, label=label)
        ax.set_title("Training Loss and Accuracy")
        ax.set_xlabel("Epoch #")
        ax.set_ylabel("Loss/Accuracy")
        ax.legend(loc="lower left")
    return _png(fig)


def confusion_png(cm: np.ndarray, title: str = "Confusion matrix") -> bytes:
    """2x2 heatmap with counts and percentages; rows true, columns predicted (Parasitized first)."""
    plt = _pyplot()
    names = np.array([["True Pos", "False Neg"], ["False Pos", "True Neg"]])
    total = max(int(cm.sum()), 1)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax)
    for i in range(2):
        for j in range(2):
            colour = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, f"{names[i, j]}\n{cm[i, j]}\n{cm[i, j] / total:.2%}",
                    ha="center", va="center", color=colour)
    ticks = ["Parasitized", "Uninfected"]
    ax.set_xticks([0, 1], ticks)
    ax.set_yticks([0, 1], ticks)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    return _png(fig)


def calibration_png(bins: list[dict], brier: float) -> bytes:
    """Reliability diagram: observed fraction Parasitized against mean predicted probability per bin."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfectly calibrated")
    pts = [(b["mean_prob"], b["frac_positive"], b["n"]) for b in bins if b["n"]]
    if pts:
        x, y, n = zip(*pts)
        ax.plot(x, y, marker="o", label="model")
        for xi, yi, ni in pts:
            ax.annotate(str(ni), (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted P(Parasitized)")
    ax.set_ylabel("observed fraction Parasitized")
    ax.set_title(f"Calibration (validation), Brier {brier:.4f}")
    ax.legend(loc="upper left")
    return _png(fig)


def model_card(cfg: dict, listing, val_mask: np.ndarray, rows: list[dict], groups: list[dict],
               history: list[dict], n_unreadable: int) -> str:
    """``model_card.md`` of a training run: data, split, recipe, metrics with intervals at the
    operating point, calibration, per-patient evidence, intended use and limitations."""
    from malaria_ray.metrics import CALL_RULE

    op, argmax = rows[0], rows[1]
    ids = set(listing.patient_ids)
    val_ids = {p for p, v in zip(listing.patient_ids, val_mask) if v}
    counts = {c: sum(1 for lab in listing.labels if lab == c) for c in ("Parasitized", "Uninfected")}

    def ci(r: dict, k: str) -> str:
        return f"{r[k]:.4f} (95% CI {r[k + '_ci_low']:.4f}-{r[k + '_ci_high']:.4f})"

    recipe = ", ".join(f"{k} {cfg[k]}" for k in ("image_size", "epochs", "batch_size", "learning_rate", "lr_schedule",
                                                   "warmup_epochs", "label_smoothing", "augment", "augment_policy", "weights",
                                                   "bn_recal_batches", "num_workers", "seed"))
    patients = [g for g in groups if g["level"] == "patient"]
    lines = [
        f"# Model card: malaria-ray ResNet50V2, model_id {cfg['model_id']}",
        "",
        "**Research use only.** Classifies single thin-smear red-blood-cell crops as Parasitized or "
        "Uninfected. It is not a diagnostic device, has not been clinically validated, and does not "
        "read whole smears: cells must be segmented and cropped as in the NIH corpus.",
        "",
        "## Data",
        f"- Corpus: `{cfg['data']}`{' (SYNTHETIC, not NIH data)' if cfg.get('synthetic') else ''}: "
        f"{len(listing)} images ({counts['Parasitized']} Parasitized, {counts['Uninfected']} Uninfected), "
        f"{len(ids)} patient/slide identities; {n_unreadable} unreadable images left out.",
        f"- Split: `{cfg['split']}` (seed {cfg['seed']}): {int((~val_mask).sum())} training / "
        f"{int(val_mask.sum())} validation images; {len(val_ids)} identities in validation"
        + (", none of them in training." if cfg["split"] == "patient" else " (image-level: patients on both sides)."),
        "",
        "## Recipe",
        f"- {('`--recipe ' + cfg['recipe'] + '`: ') if cfg.get('recipe') else ''}{recipe}.",
        f"- Best epoch by validation loss: {cfg['best_epoch']} of {len(history)}. Full config: `config.json`.",
        "",
        "## Validation metrics (per cell)",
        f"Operating point: threshold {op['threshold']:.4f}, chosen on this validation split for target "
        f"sensitivity {cfg['target_sensitivity']} (so these numbers are optimistic for the threshold itself).",
        "Intervals: 95% percentile bootstrap that resamples patients, not cells.",
        "",
        "| threshold | accuracy | sensitivity | specificity | ROC AUC |",
        "|---|---|---|---|---|",
        *[f"| {r['threshold']:.4f} ({r['threshold_kind']}) | {ci(r, 'accuracy')} | {ci(r, 'sensitivity')} | "
          f"{ci(r, 'specificity')} | {ci(r, 'roc_auc')} |" for r in (op, argmax)],
        "",
        f"Calibration: Brier score {op['brier']:.4f}; reliability diagram `plots/calibration.png`.",
        "",
        "## Evidence by patient",
        f"Call rule: {CALL_RULE}",
        f"- Patients called correctly: sensitivity {op.get('patient_sensitivity', float('nan')):.3f}, "
        f"specificity {op.get('patient_specificity', float('nan')):.3f} over {op.get('patient_n', 0)} "
        "labelled validation patients (per-slide and per-patient rows in `patients.parquet`).",
        "",
        "| patient | cells | called Parasitized | parasitemia (95% Wilson CI) | call | infected (labels) |",
        "|---|---|---|---|---|---|",
        *[f"| {g['patient_id']} | {g['n_cells']} | {g['n_pred_parasitized']} | {g['parasitemia']:.3f} "
          f"({g['parasitemia_ci_low']:.3f}-{g['parasitemia_ci_high']:.3f}) | "
          f"{'Parasitized' if g['call_parasitized'] else 'Uninfected'} | {g['infected']} |" for g in patients[:60]],
        *(["", f"({len(patients) - 60} more in `patients.parquet`)"] if len(patients) > 60 else []),
        "",
        "## Limitations",
        "- Trained and validated on NIH/NLM thin-smear cell crops (Giemsa, one site and one camera set-up); "
        "other stains, microscopes, magnifications or segmentations need their own validation.",
        "- Per-cell labels come from one expert reader; patient-level calls here aggregate cells of the "
        "NIH crops, not a full smear count.",
        "- Validation patients come from the same corpus as training; accuracy on other populations is unknown.",
        "",
    ]
    return "\n".join(lines)
