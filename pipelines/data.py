"""Loading labelled text, schema checks, label maps, splits and fold plans, and the data digest."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from pipelines.errors import UserError

logger = logging.getLogger(__name__)

# user data: cells as written (CSV: every cell a string, "01" stays "01"; JSON: no type guessing), and "NA", "None",
# "null", "N/A" are text (a label may be spelled so); read_table then makes an empty cell missing in every format
READERS = {
    ".csv": lambda p: pd.read_csv(p, encoding="utf-8", dtype=str, keep_default_na=False, na_values=[""]),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", encoding="utf-8", dtype=str, keep_default_na=False, na_values=[""]),
    ".jsonl": lambda p: pd.read_json(p, lines=True, encoding="utf-8", dtype=False),
    ".json": lambda p: pd.read_json(p, encoding="utf-8", dtype=False),
    ".parquet": pd.read_parquet,
}


class DataError(UserError):
    """The input data cannot be used; the message names the file or column and the fix."""


@dataclass(frozen=True)
class Dataset:
    """Labelled examples with a stable row id (the row's position in the source file)."""

    frame: pd.DataFrame  # columns: row_id, text, label (str), label_id
    labels: list[str]  # label_id -> label name, sorted
    digest: str

    def __len__(self) -> int:
        return len(self.frame)


def load_dataset(path: str, text_column: str, label_column: str, max_samples: int = 0, seed: int = 0) -> Dataset:
    """Read ``path`` and check it holds usable labelled text; cap it to ``max_samples`` rows (stratified)."""
    frame = read_table(path)
    for role, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in frame.columns:
            raise DataError(
                f"{path} has no column {column!r} ({role}); its columns are {list(frame.columns)}. "
                f"Pass {role}=<one of them>."
            )
    frame = pd.DataFrame({"row_id": np.arange(len(frame)), "text": frame[text_column], "label": frame[label_column]})
    missing = frame["text"].isna() | frame["label"].isna()
    if missing.any():
        logger.warning("dropping rows with empty text or label file=%s rows=%d", path, int(missing.sum()))
        frame = frame[~missing]
    frame = frame.assign(text=frame["text"].astype(str), label=frame["label"].astype(str))
    if frame.empty:
        raise DataError(f"{path} has no rows with both {text_column!r} and {label_column!r} set")
    labels = sorted(frame["label"].unique())
    if len(labels) < 2:
        raise DataError(
            f"{path}: column {label_column!r} holds a single class ({labels[0]!r}); "
            "classification needs at least two. Check label_column."
        )
    if 0 < max_samples < len(frame):
        frame = _stratified_sample(frame, max_samples, seed)
    frame = frame.reset_index(drop=True)
    frame["label_id"] = frame["label"].map({name: i for i, name in enumerate(labels)}).astype(int)
    return Dataset(frame=frame, labels=labels, digest=content_digest(frame, ["row_id", "text", "label"]))


def read_table(path: str) -> pd.DataFrame:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {path} does not exist; pass data=<path to a CSV, JSONL or Parquet file>")
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise DataError(f"data file {path}: unsupported extension {file.suffix!r}; use one of {', '.join(READERS)}")
    if file.stat().st_size == 0:
        raise DataError(f"data file {path} is empty; pass a file with a header and at least two classes of rows")
    try:
        frame = reader(file)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {path} is not UTF-8 ({exc.reason} at byte {exc.start}); "
            f"convert it, e.g. `iconv -f cp949 -t utf-8 {path} > out{file.suffix}`"
        ) from None
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"data file {path} could not be parsed as {file.suffix}: {exc}") from None
    if frame.empty:
        raise DataError(f"data file {path} has no rows")
    return _blank_as_missing(frame)


def _blank_as_missing(frame: pd.DataFrame) -> pd.DataFrame:
    """One meaning of an empty cell, whatever the format: an empty or all-whitespace string is missing, like a JSON
    null or an empty CSV cell; any other text (``NA``, ``None``, ``null``, ``N/A``) is a value."""
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values):
            frame[column] = values.mask(values.map(lambda v: isinstance(v, str) and not v.strip()).astype(bool))
    return frame


def read_artifact_csv(path: str | Path, text_columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """A CSV this project wrote (predictions, shards, scores, ledgers), read back as it was written.

    No cell is read as missing: an empty cell is ``""`` and ``NA``, ``None``, ``null``, ``N/A`` stay the text they
    are (a label may be spelled so). ``text_columns`` (None: every column) are strings, verbatim (``01`` stays
    ``01``); the others are typed by pandas (a column of numbers with an empty cell comes back as text, which fails
    loudly where numbers are expected). Every stage reads its artifacts with this, so a result restored on resume
    is the result a run that never stopped would have.
    """
    dtype = str if text_columns is None else dict.fromkeys(text_columns, str)
    return pd.read_csv(path, dtype=dtype, keep_default_na=False)


def _stratified_sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    try:
        sample, _ = train_test_split(frame, train_size=n, stratify=frame["label"], random_state=seed)
    except ValueError:  # a class too small to stratify: fall back to a plain random sample
        sample = frame.sample(n=n, random_state=seed)
    return sample.sort_values("row_id")


def content_digest(frame: pd.DataFrame, columns: list[str]) -> str:
    """Short sha256 of the given columns, row by row (tab-separated, one line per row)."""
    h = hashlib.sha256()
    for row in frame[columns].itertuples(index=False):
        h.update(("\t".join(map(str, row)) + "\n").encode())
    return h.hexdigest()[:16]


def folder_digest(folder: Path, recursive: bool = False) -> str:
    """Hash of the files that define a model folder, by name and content.

    By default the top-level weights, config and tokenizer files of a transformers folder;
    ``recursive=True`` hashes every file below ``folder`` (e.g. a pyfunc model with its members).
    """
    h = hashlib.sha256()
    files = folder.rglob("*") if recursive else folder.iterdir()
    wanted = None if recursive else (".json", ".txt", ".safetensors", ".bin", ".model")
    for path in sorted(p for p in files if p.is_file() and (wanted is None or p.suffix in wanted)):
        h.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]

def fold_plan(dataset: Dataset, k_folds: int, seed: int) -> list[np.ndarray]:
    """Validation row positions of each fold (stratified, shuffled with ``seed``)."""
    counts = dataset.frame["label"].value_counts()
    if k_folds > counts.min():
        raise DataError(
            f"k_folds={k_folds} is larger than the smallest class ({counts.idxmin()!r}, {counts.min()} rows); "
            f"lower k_folds to at most {counts.min()} or use more data (max_samples)."
        )
    splitter = StratifiedKFold(n_splits=k_folds, shuffle=True, random_state=seed)
    return [val for _, val in splitter.split(np.zeros(len(dataset)), dataset.frame["label_id"])]


def holdout_split(dataset: Dataset, fraction: float, seed: int) -> np.ndarray:
    """Validation row positions of a stratified holdout split."""
    counts = dataset.frame["label"].value_counts()
    n_val = int(np.ceil(fraction * len(dataset)))
    if counts.min() < 2 or n_val < len(counts):
        raise DataError(
            f"validation_fraction={fraction} leaves too few rows to hold out every class "
            f"(smallest class {counts.idxmin()!r} has {counts.min()} rows); raise validation_fraction or add data."
        )
    positions = np.arange(len(dataset))
    _, val = train_test_split(positions, test_size=fraction, stratify=dataset.frame["label_id"], random_state=seed)
    return np.sort(val)
