"""Shared fixtures: a tiny BERT classifier built in-process, small real data, and a runner for entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "fortunes_4class.csv"


def make_tiny_data(path: Path, per_class: int = 40) -> Path:
    """``per_class`` rows of each of 3 classes of the bundled demo data."""
    frame = pd.read_csv(DEMO_DATA)
    frame = frame[frame["label"].isin(["computers", "politics", "science"])]
    frame.groupby("label").head(per_class).reset_index(drop=True).to_csv(path, index=False)
    return path


def make_wordpiece_tokenizer(texts: list[str]):
    """A lowercasing BERT-style WordPiece tokenizer (600 pieces) trained on ``texts``, the same in every session."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials))
    # the trainer numbers some pieces in hash order, which changes between processes: renumber them (specials
    # first, the rest sorted) so that the same ids, and the same model, come out in every session
    learned = sorted(set(tokenizer.get_vocab()) - set(specials))
    tokenizer.model = models.WordPiece({token: i for i, token in enumerate(specials + learned)}, unk_token="[UNK]")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def make_tiny_model(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece vocabulary trained on the demo data."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = make_wordpiece_tokenizer(pd.read_csv(DEMO_DATA)["text"].tolist())
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)  # the same tiny model in every test session
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("data") / "tiny.csv")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def store(tmp_path) -> dict[str, str]:
    """Environment for a subprocess using a fresh SQLite tracking store in ``tmp_path``."""
    return store_env(tmp_path)


def store_env(folder: Path) -> dict[str, str]:
    """Environment for a subprocess run in ``folder``: SQLite store there, artifacts in its mlruns/."""
    env = dict(os.environ)
    env.update({
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "PIPELINES_LOG_LEVEL": "INFO",
    })
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "PIPELINES_FAILPOINT"):
        env.pop(key, None)
    return env


def entrypoint(name: str, args: dict) -> list[str]:
    """Command line for ``entrypoints/<name>.py`` with ``--key value`` arguments."""
    cmd = [sys.executable, str(ROOT / "entrypoints" / f"{name}.py")]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_entrypoint(name: str, args: dict, env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(entrypoint(name, args), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL server on 127.0.0.1 (Debian's binaries), for the session."""
    import glob
    import shutil

    from helpers import free_port

    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindirs:
        if os.environ.get("PIPELINES_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL server binaries not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    bindir = Path(bindirs[-1])
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="pipelines-pg-"))  # in /tmp: the postgres user must reach it
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")
    port = free_port()
    data = folder / "data"
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
                    "-o", f"-p {port} -h 127.0.0.1 -k {folder}", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the PostgreSQL server (workers must create every schema themselves)."""
    import uuid

    import psycopg2

    name = f"db_{uuid.uuid4().hex[:10]}"
    connection = psycopg2.connect(server_url.replace("postgresql+psycopg2", "postgresql"))
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
