"""The plots people expect beside a stage's numbers, as PNG artifacts under ``plots/``: per-fold metric bars with
mean ± std (kfold), the confusion matrix of the out-of-fold predictions (kfold, classification), learning curves
of each unit. A plot that cannot be drawn is skipped with a warning: it never fails a stage."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


@contextmanager
def figure(path: Path, columns: int = 1, size: tuple[float, float] = (5.0, 3.6)):
    """A matplotlib figure of ``columns`` axes (headless backend), saved to ``path`` and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=(size[0] * columns, size[1]), squeeze=False)
    try:
        yield fig, list(axes[0])
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def fold_bars(fold_metrics: dict[str, list[float]], path: Path) -> Path:
    """One panel per metric: a bar per fold, the mean as a line and mean ± population std as a band."""
    with figure(path, len(fold_metrics)) as (_, axes):
        for ax, (name, values) in zip(axes, fold_metrics.items()):
            mean, std = float(np.mean(values)), float(np.std(values))
            ax.bar([str(i) for i in range(len(values))], values, color="#4c72b0")
            ax.axhline(mean, color="black", linewidth=1)
            ax.axhspan(mean - std, mean + std, color="grey", alpha=0.25, linewidth=0)
            ax.set(title=f"{name}: {mean:.4f} ± {std:.4f}", xlabel="fold")
    return path


def confusion(labels: pd.Series, predicted: pd.Series, path: Path) -> Path:
    """Rows: true class, columns: predicted class, counts in the cells."""
    classes = sorted(set(labels.astype(str)) | set(predicted.astype(str)))
    counts = pd.crosstab(labels.astype(str), predicted.astype(str)).reindex(index=classes, columns=classes,
                                                                            fill_value=0)
    side = max(3.6, 0.45 * len(classes) + 2)
    with figure(path, size=(side + 1, side)) as (fig, (ax,)):
        image = ax.imshow(counts.to_numpy(), cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (out-of-fold)")
        if len(classes) <= 20:
            for (i, j), value in np.ndenumerate(counts.to_numpy()):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax)
    return path


def learning_curves(history: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path:
    """The training loss, the evaluation loss and the evaluation metric over optimizer steps, a panel each."""
    names = [name for name in dict.fromkeys(("loss", "eval_loss", f"eval_{metric}")) if history.get(name)]
    if not names:
        raise ValueError("no training or evaluation metrics logged")
    with figure(path, len(names)) as (_, axes):
        for ax, name in zip(axes, names):
            steps, values = zip(*sorted(history[name]))
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            ax.set(title=name, xlabel="step")
    return path


def optuna_figure(plot: Callable, study, path: Path) -> Path:
    """An ``optuna.visualization.matplotlib`` plot of ``study`` saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = plot(study)
    axes = axes.flat[0] if isinstance(axes, np.ndarray) else axes
    try:
        axes.figure.savefig(path, bbox_inches="tight", dpi=110)
    finally:
        plt.close(axes.figure)
    return path


def upload(tracker, run_id: str, drawings: dict[str, Callable[[Path], Path]]) -> None:
    """Draw each ``name: draw(path)`` and upload it to ``plots/`` of ``run_id``; a failure only warns."""
    with tempfile.TemporaryDirectory(prefix="pipelines-plots-") as tmp:
        for name, draw in drawings.items():
            try:
                tracker.upload(run_id, draw(Path(tmp, name)), "plots")
            except Exception as exc:  # noqa: BLE001 - a plot must never fail the stage it illustrates
                logger.warning("plot %s of run %s skipped: %s", name, run_id, exc)
