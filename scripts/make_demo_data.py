"""Build the bundled demo dataset from ../shared/data/fortunes_en.jsonl.

500 fortunes from each of four categories, sampled with a fixed seed, written to
data/fortunes_4class.csv with columns `text` and `label`.  Run once by a maintainer;
the CSV is committed so a fresh clone needs nothing outside the project.
"""

import argparse
from pathlib import Path

import pandas as pd

CATEGORIES = ["computers", "politics", "science", "work"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="../shared/data/fortunes_en.jsonl")
    parser.add_argument("--out", default="data/fortunes_4class.csv")
    parser.add_argument("--per_class", type=int, default=500)
    args = parser.parse_args()

    df = pd.read_json(args.source, lines=True)
    df = df[df["category"].isin(CATEGORIES)]
    df["text"] = df["text"].str.strip()
    df = df[df["text"].str.len() > 0].drop_duplicates("text")
    sample = df.groupby("category").sample(n=args.per_class, random_state=0)
    sample = sample.sample(frac=1.0, random_state=0)  # interleave classes
    out = sample.rename(columns={"category": "label"})[["text", "label"]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, index=False)
    print(f"wrote {len(out)} rows to {args.out}")


if __name__ == "__main__":
    main()
