"""The plot artifacts: each figure drawn from known numbers, and a plot that cannot be drawn never fails a stage."""

from __future__ import annotations

import logging

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from pipelines import plots


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plots close after saving them, kept open to be read."""
    import matplotlib.pyplot

    figures = []
    monkeypatch.setattr(matplotlib.pyplot, "close", figures.append)
    return figures


def test_fold_bars_title_each_metric_with_its_mean_and_std(tmp_path, drawn):
    path = plots.fold_bars({"accuracy": [0.5, 0.7, 0.9], "loss": [1.0, 1.0, 1.0]}, tmp_path / "f.png")
    image = matplotlib.image.imread(path)
    assert image.shape[1] > 2 * image.shape[0]  # two panels side by side
    accuracy, loss = drawn[0].axes
    assert accuracy.get_title() == f"accuracy: 0.7000 ± {np.std([0.5, 0.7, 0.9]):.4f}"
    assert loss.get_title() == "loss: 1.0000 ± 0.0000"
    assert [round(bar.get_height(), 3) for bar in accuracy.containers[0]] == [0.5, 0.7, 0.9]


def test_confusion_matrix_counts(tmp_path, drawn):
    labels = pd.Series(["a", "a", "b", "c", "c", "c"])
    predicted = pd.Series(["a", "b", "b", "c", "a", "c"])
    plots.confusion(labels, predicted, tmp_path / "c.png")
    counts = drawn[0].axes[0].images[0].get_array()
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]  # rows: true a, b, c; columns: predicted
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_learning_curves_need_metrics_and_a_failed_plot_only_warns(tmp_path, caplog):
    history = {"loss": [(10, 1.2), (20, 0.9)], "eval_loss": [(12, 1.0), (24, 0.8)], "eval_f1_macro": [(12, 0.4)]}
    assert plots.learning_curves(history, "f1_macro", tmp_path / "l.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no training or evaluation metrics"):
        plots.learning_curves({}, "f1_macro", tmp_path / "none.png")

    class Tracker:
        uploaded = []

        def upload(self, run_id, path, artifact_path):
            self.uploaded.append((run_id, path.name, artifact_path))

    tracker = Tracker()
    with caplog.at_level(logging.WARNING):
        plots.upload(tracker, "r1", {"bad.png": lambda p: plots.learning_curves({}, "x", p),
                                     "good.png": lambda p: plots.learning_curves(history, "f1_macro", p)})
    assert tracker.uploaded == [("r1", "good.png", "plots")]
    assert "plot bad.png of run r1 skipped: no training or evaluation metrics" in caplog.text
