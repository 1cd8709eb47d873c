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
