"""Platform overhead: the same fine-tune on a bare transformers `Trainer` and through the `train` stage, one
process, and the ratio of their wall times (issue target: at most 1.03).

Both train the same model on the same rows with the same settings: MiniLM (bundled), 2,000 rows of the demo data,
the stage's 80/20 stratified holdout (the same rows, in the same order, so both see identical batches), seed 42
for the classifier head and the data order, 2 epochs, max_length 64, batch 16, an evaluation and a checkpoint each
epoch (the latest two kept), the final model saved and the validation rows predicted. The bare run writes its
checkpoints to a local folder and tracks nothing; the stage run tracks everything in a SQLite store with local
artifacts (checkpoints uploaded with manifests, metrics, params, model, predictions, plots).

    python benchmarks/overhead.py [--rows 2000] [--epochs 2] [--repeat 1]

Imports, the one-time creation of the SQLite store (printed apart: the first run on a new store pays it) and a
warm-up (a bare 64-row fine-tune: the first forward and backward passes initialise lazily) happen before either
clock starts. With ``--repeat N`` the pair runs N times, alternating which goes first, and
the median ratio is printed too. Prints each wall time, the ratio, and the stage's checkpoint upload seconds
(spent in the background upload thread, from its log).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from pipelines.config import TrainConfig  # noqa: E402
from pipelines.models import resolve_model  # noqa: E402
from pipelines.settings import parse_config  # noqa: E402
from pipelines.tasks import get_task  # noqa: E402

DATA = ROOT / "data" / "fortunes_4class.csv"
matplotlib.use("Agg")  # the stage's plots: imported before the clocks start, as transformers is
import matplotlib.pyplot  # noqa: E402, F401


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int):
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def bare(model_path: str, frame: pd.DataFrame, valid: np.ndarray, opts, work: Path) -> float:
    """What a user writes without the platform: tokenize, Trainer, train, save, predict."""
    started = time.perf_counter()
    labels = sorted(frame["label"].unique())
    ids = frame["label"].map({label: i for i, label in enumerate(labels)}).tolist()
    train = np.setdiff1d(np.arange(len(frame)), valid)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    set_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(labels))
    texts = frame["text"].tolist()

    def encode(rows):
        return Encoded(tokenizer, [texts[i] for i in rows], [ids[i] for i in rows], opts.max_length)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = TrainingArguments(output_dir=str(work / f"bare-{time.time_ns()}"), num_train_epochs=opts.epochs,
                             learning_rate=5e-5,
                             per_device_train_batch_size=16, per_device_eval_batch_size=64, eval_strategy="epoch",
                             save_strategy="epoch", save_total_limit=2, logging_steps=10, report_to="none", seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=encode(train), eval_dataset=encode(valid),
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    trainer.save_model(args.output_dir + "-model")
    trainer.predict(encode(valid))
    return time.perf_counter() - started


def stage(model_path: str, data: Path, opts, work: Path) -> tuple[float, float]:
    """The `train` stage in this process, on the SQLite store; returns wall and checkpoint-upload seconds."""
    from pipelines.stages import train

    cfg = parse_config(TrainConfig, ["--data", str(data), "--model", model_path, "--epochs", str(opts.epochs),
                                     "--max_length", str(opts.max_length), "--batch_size", "16",
                                     "--experiment_name", "overhead"])
    uploads = _UploadSeconds()
    logging.getLogger("pipelines.checkpoints").addHandler(uploads)
    started = time.perf_counter()
    train.run(cfg)
    elapsed = time.perf_counter() - started
    logging.getLogger("pipelines.checkpoints").removeHandler(uploads)
    return elapsed, uploads.seconds


def create_store(work: Path) -> float:
    """The SQLite store, created once (what the first run on a new store pays), and its creation seconds."""
    from pipelines.tracking import Tracker

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    started = time.perf_counter()
    Tracker("overhead")
    return time.perf_counter() - started


class _UploadSeconds(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds = 0.0

    def emit(self, record):
        match = re.search(r"checkpoint uploaded .* seconds=([0-9.]+)", record.getMessage())
        if match:
            self.seconds += float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    opts = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pipelines.checkpoints").setLevel(logging.INFO)
    frame = pd.read_csv(DATA).groupby("label").head(opts.rows // 4).reset_index(drop=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{len(frame)} rows, {opts.epochs} epochs, max_length {opts.max_length}")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        work = Path(tmp)
        data = work / "data.csv"
        frame.to_csv(data, index=False)
        cfg = parse_config(TrainConfig, ["--data", str(data)])
        valid = get_task(cfg.task).holdout(get_task(cfg.task).load(cfg), cfg)
        model_path = resolve_model("sentence-transformers/all-MiniLM-L6-v2", work / "cache").path
        print(f"one-time SQLite store creation (not counted): {create_store(work):.1f} s")
        small = frame.groupby("label").head(16).reset_index(drop=True)
        warm = argparse.Namespace(epochs=1, max_length=opts.max_length)  # lazy initialisations, untimed
        print(f"warm-up (not counted): {bare(model_path, small, np.arange(0, len(small), 4), warm, work):.1f} s")
        for i in range(opts.repeat):
            order = ("bare", "stage") if i % 2 == 0 else ("stage", "bare")
            runs = {name: bare(model_path, frame, valid, opts, work) if name == "bare"
                    else stage(model_path, data, opts, work) for name in order}
            bare_s, (stage_s, upload_s) = runs["bare"], runs["stage"]
            ratios.append(stage_s / bare_s)
            print(f"pair {i + 1} ({order[0]} first): bare Trainer {bare_s:.1f} s, train stage {stage_s:.1f} s "
                  f"(checkpoint uploads {upload_s:.1f} s in the background), ratio {ratios[-1]:.3f}")
    print(f"ratio: {float(np.median(ratios)):.3f} (median of {len(ratios)}; target <= 1.03)")


if __name__ == "__main__":
    main()
