"""Bad input exits non-zero with a message naming the problem and the fix, and leaves no FINISHED run."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import run_entrypoint
from helpers import client


def _write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


CASES = {
    "missing file": (lambda d, m: {"data": d.parent / "nope.csv"}, ["nope.csv does not exist", "data=<path"]),
    "missing column": (lambda d, m: {"data": d, "text_column": "body"},
                       ["no column 'body'", "Pass text_column=<one of them>"]),
    "empty file": (lambda d, m: {"data": _write(d.parent / "empty.csv", "")}, ["empty.csv is empty"]),
    "single class": (lambda d, m: {"data": _write(d.parent / "one.csv", "text,label\na,x\nb,x\nc,x\n")},
                     ["holds a single class ('x')", "Check label_column"]),
    "not utf-8": (lambda d, m: {"data": _write(d.parent / "cp949.csv", b"text,label\n"
                                               + "좋아요,pos\n싫어요,neg\n".encode("cp949"))},
                  ["cp949.csv is not UTF-8", "iconv"]),
    "unknown model path": (lambda d, m: {"model": d.parent / "no-such-model"},
                           ["no-such-model does not exist", "pass model=<a local folder"]),
    "k_folds too large": (lambda d, m: {"k_folds": 41}, ["k_folds=41 is larger than the smallest class",
                                                           "lower k_folds to at most 40"]),
    "bad setting": (lambda d, m: {"scheduler_type": "triangle"}, ["scheduler_type='triangle' is not one of"]),
    "ema_decay out of range": (lambda d, m: {"ema_decay": 1.5}, ["ema_decay=1.5 must be in (0, 1)"]),
    "unknown variant": (lambda d, m: {"config_file": _write(d.parent / "v.yaml", "variants: {small: {epochs: 1}}\n"),
                                      "variant": "large"},
                        ["variant='large' is not in config_file", "its variants are small"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly(case, tiny_data, tiny_model, tmp_path, store):
    make_args, expected = CASES[case]
    data = tmp_path / "in" / "data.csv"
    data.parent.mkdir()
    pd.read_csv(tiny_data).to_csv(data, index=False)
    args = {"data": data, "model": tiny_model, "k_folds": 3, "epochs": 1, "experiment_name": "bad"}
    args.update(make_args(data, tiny_model))
    proc = run_entrypoint("kfold", args, store, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for text in expected:
        assert text in proc.stderr
    assert "Traceback" not in proc.stderr
    if (tmp_path / "mlflow.db").exists():
        exp = client(store).get_experiment_by_name("bad")
        runs = client(store).search_runs([exp.experiment_id]) if exp else []
        assert not [r for r in runs if r.info.status == "FINISHED"]
