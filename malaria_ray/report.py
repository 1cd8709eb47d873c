"""Plots (the notebook's curves and confusion-matrix heatmap) and one-screen summaries."""

from __future__ import annotations

import io

import numpy as np

from malaria_ray.schema import CLASS_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS


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
    ticks = list(CLASS_NAMES)
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


def confident_disagreements(y: np.ndarray, probs: np.ndarray, threshold: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of up to ``n`` labelled-Parasitized images the model calls Uninfected, lowest score
    first, and of up to ``n`` labelled-Uninfected images it calls Parasitized, highest first: the
    images whose labels (or the model) a person should look at first."""
    y, probs = np.asarray(y, bool), np.asarray(probs, float)
    called = probs >= threshold
    missed = np.flatnonzero(y & ~called)
    flagged = np.flatnonzero(~y & called)
    return (missed[np.argsort(probs[missed], kind="stable")][:n],
            flagged[np.argsort(-probs[flagged], kind="stable")][:n])


def disagreements_png(missed: list[tuple[np.ndarray, float]], flagged: list[tuple[np.ndarray, float]],
                      threshold: float) -> bytes:
    """Two rows of cells as the model saw them (uint8 RGB, the training size), each with its score:
    labelled Parasitized but called Uninfected, and labelled Uninfected but called Parasitized."""
    plt = _pyplot()
    cols = max(len(missed), len(flagged), 1)
    fig, axes = plt.subplots(2, cols, figsize=(1.3 * cols + 0.4, 3.8), squeeze=False)
    for r, (cells, what) in enumerate(((missed, "labelled Parasitized, called Uninfected"),
                                       (flagged, "labelled Uninfected, called Parasitized"))):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(cells):
                ax.imshow(cells[c][0])
                ax.set_title(f"p={cells[c][1]:.3f}", fontsize=7)
        axes[r][0].text(0, 1.3, f"{what} (most confident first)" + ("" if cells else ": none"),
                        transform=axes[r][0].transAxes, fontsize=8, ha="left")
    fig.suptitle(f"Validation disagreements at threshold {threshold:.4f}: review the labels as well as the model",
                 fontsize=9, y=1.06)
    fig.subplots_adjust(hspace=0.6)
    return _png(fig)


def model_card(cfg: dict, listing, val_mask: np.ndarray, rows: list[dict], groups: list[dict],
               history: list[dict], n_unreadable: int) -> str:
    """``model_card.md`` of a training run: data, split, recipe, metrics with intervals at the
    operating point, calibration, per-patient evidence, intended use and limitations."""
    from malaria_ray import schema
    from malaria_ray.metrics import CALL_RULE, infected

    op, argmax = rows[0], rows[1]
    ids = set(listing.patient_ids)
    val_ids = {p for p, v in zip(listing.patient_ids, val_mask) if v}
    counts = {c: sum(1 for lab in listing.labels if lab == c) for c in CLASS_NAMES}

    def ci(r: dict, k: str) -> str:
        return f"{r[k]:.4f} (95% CI {r[k + '_ci_low']:.4f}-{r[k + '_ci_high']:.4f})"

    recipe = ", ".join(f"{k} {cfg.get(k)}" for k in ("image_size", "epochs", "batch_size", "learning_rate",
                                                       "lr_schedule", "warmup_epochs", "label_smoothing",
                                                       "class_weight", "augment", "augment_policy", "weights",
                                                       "bn_recal_batches", "num_workers", "seed"))
    patients = [g for g in groups.to_pylist() if g[schema.COL_LEVEL] == "patient"]
    lines = [
        f"# Model card: malaria-ray ResNet50V2, model_id {cfg['model_id']}",
        "",
        "**Research use only.** Classifies single thin-smear red-blood-cell crops as Parasitized or "
        "Uninfected. It is not a diagnostic device, has not been clinically validated, and does not "
        "read whole smears: cells must be segmented and cropped as in the NIH corpus.",
        "",
        "## Data",
        f"- Corpus: `{cfg['data']}`{' (SYNTHETIC, not NIH data)' if cfg.get('synthetic') else ''}: "
        f"{len(listing)} images ({', '.join(f'{counts[c]} {c}' for c in CLASS_NAMES)}), "
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
        "The most confident disagreements with the labels, as the model saw them: `plots/disagreements.png`. "
        "Look at them before trusting the error rate: wrong labels count as model errors"
        + ("." if cfg.get("synthetic") else "; on the NIH corpus, a visual check of one split's errors found "
           "many confident 'misses' that show no visible parasite (docs/training.md, \"What the errors are\")."),
        "",
        "## Evidence by patient",
        f"Call rule: {CALL_RULE}",
        f"- Patients called correctly: sensitivity {op.get('patient_sensitivity', float('nan')):.3f}, "
        f"specificity {op.get('patient_specificity', float('nan')):.3f} over {op.get('patient_n', 0)} "
        "labelled validation patients (per-slide and per-patient rows in `patients.parquet`).",
        "",
        "| patient | cells | called Parasitized | parasitemia (95% Wilson CI) | call | infected (labels) |",
        "|---|---|---|---|---|---|",
        *[f"| {g[schema.COL_PATIENT]} | {g[schema.COL_N_CELLS]} | {g[schema.COL_N_PRED_POS]} | "
          f"{g[schema.COL_FRAC_POS]:.3f} ({g[schema.COL_FRAC_LOW]:.3f}-{g[schema.COL_FRAC_HIGH]:.3f}) | "
          f"{POSITIVE_CLASS if g[schema.COL_CALL] else NEGATIVE_CLASS} | {infected(g)} |" for g in patients[:60]],
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
