"""Platform overhead: the same fine-tune on a bare transformers `Trainer` and through the `train` stage, one
process, and the ratio of their wall times (issue target: at most 1.03).

Both train the same model on the same rows with the same settings: MiniLM (bundled), 2,000 rows of the demo data,
80/20 stratified holdout, 2 epochs, max_length 64, batch 16, an evaluation and a checkpoint each epoch (the
latest two kept), the final model saved and the validation rows predicted. The bare run writes its checkpoints
to a local folder and tracks nothing; the stage run tracks everything in a fresh SQLite store with local
artifacts (checkpoints uploaded with manifests, metrics, params, model, predictions, plots).

    python benchmarks/overhead.py [--rows 2000] [--epochs 2] [--order bare-first|stage-first]

Imports happen before either clock starts. Prints each wall time, the ratio, and the stage's checkpoint upload
seconds (from its log).
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

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sklearn.model_selection import train_test_split  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from pipelines.config import TrainConfig, parse_config  # noqa: E402
from pipelines.models import resolve_model  # noqa: E402

DATA = ROOT / "data" / "fortunes_4class.csv"


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int):
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def bare(model_path: str, frame: pd.DataFrame, opts, work: Path) -> float:
    """What a user writes without the platform: tokenize, Trainer, train, save, predict."""
    started = time.perf_counter()
    labels = sorted(frame["label"].unique())
    ids = frame["label"].map({label: i for i, label in enumerate(labels)}).tolist()
    train, valid = train_test_split(np.arange(len(frame)), test_size=0.2, stratify=ids, random_state=42)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(labels))
    texts = frame["text"].tolist()

    def encode(rows):
        return Encoded(tokenizer, [texts[i] for i in rows], [ids[i] for i in rows], opts.max_length)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = TrainingArguments(output_dir=str(work / "bare"), num_train_epochs=opts.epochs, learning_rate=5e-5,
                             per_device_train_batch_size=16, per_device_eval_batch_size=64, eval_strategy="epoch",
                             save_strategy="epoch", save_total_limit=2, logging_steps=10, report_to="none", seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=encode(train), eval_dataset=encode(valid),
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    trainer.save_model(str(work / "bare-model"))
    trainer.predict(encode(valid))
    return time.perf_counter() - started


def stage(model_path: str, data: Path, opts, work: Path) -> tuple[float, float]:
    """The `train` stage in this process, on a fresh SQLite store; returns wall and checkpoint-upload seconds."""
    from pipelines.stages import train

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    cfg = parse_config(TrainConfig, ["--data", str(data), "--model", model_path, "--epochs", str(opts.epochs),
                                     "--max_length", str(opts.max_length), "--batch_size", "16",
                                     "--experiment_name", "overhead"])
    uploads = _UploadSeconds()
    logging.getLogger("pipelines.checkpoints").addHandler(uploads)
    started = time.perf_counter()
    train.run(cfg)
    return time.perf_counter() - started, uploads.seconds


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
    parser.add_argument("--order", choices=("bare-first", "stage-first"), default="bare-first")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pipelines.checkpoints").setLevel(logging.INFO)
    frame = pd.read_csv(DATA).groupby("label").head(opts.rows // 4).reset_index(drop=True)
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        work = Path(tmp)
        data = work / "data.csv"
        frame.to_csv(data, index=False)
        model_path = resolve_model("sentence-transformers/all-MiniLM-L6-v2", work / "cache").path
        runs = {}
        for name in (("bare", "stage") if opts.order == "bare-first" else ("stage", "bare")):
            runs[name] = bare(model_path, frame, opts, work) if name == "bare" else stage(model_path, data, opts, work)
    bare_s, (stage_s, upload_s) = runs["bare"], runs["stage"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{len(frame)} rows, {opts.epochs} epochs, max_length {opts.max_length}, order {opts.order}")
    print(f"bare Trainer: {bare_s:.1f} s")
    print(f"train stage:  {stage_s:.1f} s (checkpoint uploads {upload_s:.1f} s)")
    print(f"ratio: {stage_s / bare_s:.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
