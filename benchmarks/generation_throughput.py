"""Generation throughput (examples/s): the `predict` stage against a plain one-at-a-time `model.generate` loop and
against batched generation (in input order, and sorted by length as `predict` does).

    python benchmarks/generation_throughput.py [--model minilm|tiny|PATH] [--rows 256] [--batch_size 16]

``minilm``: the bundled MiniLM warm-started as an encoder-decoder (the README demo's model, untrained: the same work
per token as a trained one); ``tiny``: the 2-layer test BART; or any seq2seq folder. ``min_new_tokens`` is set, so
every method generates comparable lengths. Prints one line per method and whether its summaries equal the loop's.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipelines.generation import decode, generate, generation_config, load_summarizer  # noqa: E402

logger = logging.getLogger("benchmark")


def build_model(name: str, folder: Path) -> Path:
    if name == "tiny":
        from seq2seq_fixtures import make_tiny_bart

        return make_tiny_bart(folder)
    if name == "minilm":
        from transformers import AutoTokenizer

        from pipelines.config import DEFAULT_MODEL
        from pipelines.models import resolve_model
        from pipelines.tasks.summarization.task import warm_start

        path = resolve_model(DEFAULT_MODEL, folder / "cache").path
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(0)
        warm_start(path, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    return Path(name)


def loop(network, tokenizer, texts, config, args) -> list[str]:
    out = []
    for text in texts:
        batch = tokenizer([text], truncation=True, max_length=args.max_source_length, return_tensors="pt")
        with torch.no_grad():
            ids = network.generate(**batch, generation_config=config)
        out.append(decode(tokenizer, ids.numpy())[0][0])
    return out


def batched(network, tokenizer, texts, config, args) -> list[str]:
    out = []
    for start in range(0, len(texts), args.batch_size):
        batch = tokenizer(texts[start:start + args.batch_size], truncation=True, max_length=args.max_source_length,
                          padding=True, return_tensors="pt")
        with torch.no_grad():
            ids = network.generate(**batch, generation_config=config)
        out.extend(decode(tokenizer, ids.numpy())[0])
    return out


def sorted_by_length(network, tokenizer, texts, config, args) -> list[str]:
    return generate(network, tokenizer, texts, config, args.batch_size, args.max_source_length)


def predict_stage(model: Path, data: Path, column: str, args, tmp: Path) -> tuple[float, list[str]]:
    """The real `predict` entry point on a fresh SQLite store: wall time including start-up and tracking."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true",
           "TOKENIZERS_PARALLELISM": "false"}
    output = tmp / "predictions.csv"
    cmd = [sys.executable, str(ROOT / "entrypoints" / "predict.py"), "--model_uri", str(model), "--data", str(data),
           "--text_column", column, "--shard_size", "64", "--eval_batch_size", str(args.batch_size),
           "--max_length", str(args.max_source_length), "--num_beams", str(args.num_beams), "--max_new_tokens",
           str(args.max_new_tokens), "--min_new_tokens", str(args.min_new_tokens), "--output", str(output),
           "--experiment_name", "bench"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=tmp, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return seconds, pd.read_csv(output, keep_default_na=False, dtype={"generated": str})["generated"].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--column", default="description_en")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_beams", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--min_new_tokens", type=int, default=8)
    parser.add_argument("--max_source_length", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(args.model, tmp / "model")
        frame = pd.read_json(ROOT / "data" / "debian_summaries.jsonl", lines=True).head(args.rows)
        data = tmp / "texts.jsonl"
        frame[[args.column]].to_json(data, orient="records", lines=True, force_ascii=False)
        texts = frame[args.column].tolist()
        network, tokenizer = load_summarizer(model)
        settings = SimpleNamespace(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                   min_new_tokens=args.min_new_tokens, repetition_penalty=1.0, length_penalty=1.0,
                                   no_repeat_ngram_size=0)
        config = generation_config(network, settings)
        sorted_by_length(network, tokenizer, texts[:4], config, args)  # warm-up
        results = {}
        for name, method in (("loop (batch 1)", loop), ("batched, input order", batched),
                             ("batched, sorted by length", sorted_by_length)):
            logger.info("timing %s", name)
            start = time.perf_counter()
            summaries = method(network, tokenizer, texts, config, args)
            results[name] = (time.perf_counter() - start, summaries)
        logger.info("timing the predict stage")
        results["predict stage (process, store, shards)"] = predict_stage(model, data, args.column, args, tmp)
    report(results, args)


def report(results: dict, args) -> None:
    reference = results["loop (batch 1)"]
    print(f"\n{args.rows} rows of {args.column}, model {args.model}, batch_size {args.batch_size}, num_beams "
          f"{args.num_beams}, new tokens {args.min_new_tokens}..{args.max_new_tokens}, source <= "
          f"{args.max_source_length} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()} {os.cpu_count()} cores")
    print(f"{'method':42} {'seconds':>8} {'examples/s':>11} {'vs loop':>8} {'same summaries as loop':>24}")
    for name, (seconds, summaries) in results.items():
        same = sum(a == b for a, b in zip(summaries, reference[1]))
        print(f"{name:42} {seconds:8.1f} {args.rows / seconds:11.2f} {reference[0] / seconds:7.2f}x "
              f"{same:>17}/{args.rows}")


if __name__ == "__main__":
    main()
