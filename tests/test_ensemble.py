"""`ensemble`, `predict`, `retrain` and serving: real runs, a real registry, real HTTP to `mlflow models serve`."""

from __future__ import annotations

import io
import json
import logging
import shutil
import signal
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_entrypoint, store_env
from helpers import artifact_text, children, client, metric_steps, parents, serving
from sklearn.metrics import f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipelines.config import EnsembleConfig
from pipelines.settings import fingerprint
from pipelines.stages import contract
from pipelines.stages import ensemble as stage
from pipelines.tasks.voting import fit_weights, heldout_report, heldout_split

pytestmark = pytest.mark.slow
LONG = "The senator said that the new computer for the science lab crashed again during the budget vote last week."
TEXTS = ["The computer crashed again.", "Vote for the senator!", "Atoms are mostly empty space.", "x", LONG]
RECORDED_MAX_LENGTH_B = 12  # what source b's config.json says it used; its params say 32


@pytest.fixture(scope="module")
def cv(tiny_data, tiny_model, tmp_path_factory):
    """Two finished 3-fold kfold runs (different seeds) in one store.

    Source b's recorded settings (config.json) say max_length=12 while its params say 32, as in runs made
    when the `mlflow run` launcher (whose params are the literal -P values) was the stage's parent: the
    ensemble must use the recorded value.
    """
    folder = tmp_path_factory.mktemp("ensemble-store")
    env = store_env(folder)
    for seed in (1, 2):
        args = {"data": tiny_data, "model": tiny_model, "k_folds": 3, "epochs": 2, "max_length": 32,
                "learning_rate": 1e-3, "seed": seed, "early_stopping_patience": 1, "experiment_name": "ens"}
        proc = run_entrypoint("kfold", args, env, folder)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = parents(env, "ens", "kfold")
    record = json.loads(artifact_text(env, b.info.run_id, "config.json", folder / "config-b"))
    record["settings"]["max_length"] = RECORDED_MAX_LENGTH_B
    rewritten = folder / "rewritten" / "config.json"
    rewritten.parent.mkdir()
    rewritten.write_text(json.dumps(record))
    client(env).log_artifact(b.info.run_id, str(rewritten))
    return {"env": env, "folder": folder, "a": a, "b": b}


def ensemble(cv, name, *sources, env=None, **extra):
    args = {"source_runs": ",".join(s.info.run_id for s in sources), "registered_model_name": name,
            "experiment_name": "ens", **extra}
    return run_entrypoint("ensemble", args, {**cv["env"], **(env or {})}, cv["folder"])


def fold_runs(cv, source) -> list:
    return sorted(children(cv["env"], "ens", source.info.run_id), key=lambda r: int(r.data.tags["fold"]))


def independent_average(env, members, texts, tmp) -> np.ndarray:
    """Soft vote computed here, from the fold models' own artifacts, without pipelines' inference code.

    ``members``: (fold run, weight, max_length) triples.
    """
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    total = 0
    for run, weight, max_length in members:
        uri = f"runs:/{run.info.run_id}/model"
        path = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp / run.info.run_id))
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits
        total = total + weight * torch.softmax(logits.double(), dim=-1).numpy()
    return total


def oof_probs(cv, source, tmp) -> pd.DataFrame:
    frame = pd.read_csv(io.StringIO(artifact_text(cv["env"], source.info.run_id, "oof_predictions.csv", tmp)))
    return frame.set_index("row_id").sort_index()


def test_score_weighted_pair_equals_independent_average_with_recorded_max_length(cv, tmp_path):
    env, a, b = cv["env"], cv["a"], cv["b"]
    sa, sb = a.data.metrics["cv_f1_macro_mean"], b.data.metrics["cv_f1_macro_mean"]
    assert sa != sb, "the sources must score differently for score weights to mean anything"
    assert b.data.params["max_length"] == "32"  # the params disagree with the recorded settings
    proc = ensemble(cv, "pair", a, b, weights="score")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = parents(env, "ens", "ensemble")[-1]
    wa, wb = sa / (sa + sb), sb / (sa + sb)
    assert float(run.data.params[f"weight_{a.info.run_id}"]) == round(wa, 6)
    assert float(run.data.params[f"weight_{b.info.run_id}"]) == round(wb, 6)
    spec = json.loads(artifact_text(env, run.info.run_id, "ensemble.json", tmp_path / "spec"))
    assert [m["max_length"] for m in spec["members"]] == [32] * 3 + [RECORDED_MAX_LENGTH_B] * 3

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    out = mlflow.pyfunc.load_model("models:/pair@champion").predict(pd.DataFrame({"text": TEXTS}))
    got = out[["prob_computers", "prob_politics", "prob_science"]].to_numpy()
    folds_a, folds_b = fold_runs(cv, a), fold_runs(cv, b)
    members = [(r, wa / 3, 32) for r in folds_a] + [(r, wb / 3, RECORDED_MAX_LENGTH_B) for r in folds_b]
    expected = independent_average(env, members, TEXTS, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert out["label"].tolist() == [["computers", "politics", "science"][i] for i in expected.argmax(axis=1)]
    with_params = independent_average(env, [(r, w, 32) for r, w, _ in members], TEXTS, tmp_path)
    assert not np.allclose(got, with_params, rtol=0, atol=1e-6), "LONG must be truncated differently at 12 and 32"

    assert run.data.tags["member_runs"] == ",".join(r.info.run_id for r in folds_a + folds_b)
    assert run.data.tags["source_fingerprints"] == f"{a.data.tags['fingerprint']},{b.data.tags['fingerprint']}"
    assert run.data.tags["data_digests"] == a.data.tags["data_digest"]
    oof_a, oof_b = oof_probs(cv, a, tmp_path / "oa"), oof_probs(cv, b, tmp_path / "ob")
    columns = ["prob_computers", "prob_politics", "prob_science"]
    vote = (wa * oof_a[columns].to_numpy() + wb * oof_b[columns].to_numpy()).argmax(axis=1)
    predicted = [["computers", "politics", "science"][i] for i in vote]
    assert run.data.metrics["ensemble_f1_macro"] == pytest.approx(f1_score(oof_a["label"], predicted, average="macro"),
                                                                  abs=1e-12)
    assert client(env).get_model_version_by_alias("pair", "champion").run_id == run.info.run_id


def test_fit_weights_puts_the_mass_on_the_informative_source():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    informative = rng.dirichlet(np.ones(3), size=len(y)) * 0.5
    informative[np.arange(len(y)), y] += 0.5  # the true class always gets at least half the mass
    noise = [rng.dirichlet(np.ones(3), size=len(y)) for _ in range(2)]
    weights = fit_weights([noise[0], informative, noise[1]], y, "f1_macro", seed=3)
    assert weights[1] > 0.6, weights
    assert abs(weights.sum() - 1) < 1e-9
    assert f1_score(y, informative.argmax(axis=1), average="macro") == 1.0


def test_heldout_metrics_score_rows_the_fit_did_not_see():
    y = np.repeat(np.arange(3), 30)
    fit_rows, held_rows = heldout_split(y, seed=7)
    assert not set(fit_rows) & set(held_rows) and sorted([*fit_rows, *held_rows]) == list(range(len(y)))
    assert all(np.bincount(y[rows]).tolist() == [15, 15, 15] for rows in (fit_rows, held_rows))
    # source 0 is right exactly on the fit half, source 1 exactly on the held-out half
    right, wrong = np.eye(3)[y] * 0.8 + 0.1, np.eye(3)[(y + 1) % 3] * 0.8 + 0.1
    first, second = wrong.copy(), right.copy()
    first[fit_rows], second[fit_rows] = right[fit_rows], wrong[fit_rows]
    report = heldout_report([first, second], y, "f1_macro", 7, {"equal": np.array([0.5, 0.5])})
    fitted = fit_weights([first[fit_rows], second[fit_rows]], y[fit_rows], "f1_macro", 7)
    assert fitted.tolist() == [1.0, 0.0]  # the fit only saw rows where source 0 is right
    held = lambda w: f1_score(y[held_rows], (w[0] * first + w[1] * second)[held_rows].argmax(axis=1), average="macro")
    assert report["heldout_optimized_f1_macro"] == held(fitted) == 0.0
    assert report["heldout_equal_f1_macro"] == held([0.5, 0.5])


def test_optimized_weights_are_fitted_reported_and_registered(cv, tmp_path):
    a, b = cv["a"], cv["b"]
    proc = ensemble(cv, "optimized", a, b, weights="optimized")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = parents(cv["env"], "ens", "ensemble")[-1]
    m = run.data.metrics
    for name in ("heldout_optimized_f1_macro", "heldout_score_f1_macro", "heldout_equal_f1_macro",
                 "fit_optimized_f1_macro", "fit_equal_f1_macro", "source0_f1_macro", "source1_f1_macro"):
        assert 0.0 <= m[name] <= 1.0
    oof_a, oof_b = oof_probs(cv, a, tmp_path / "oa"), oof_probs(cv, b, tmp_path / "ob")
    columns = ["prob_computers", "prob_politics", "prob_science"]
    y = oof_a["label"].map({"computers": 0, "politics": 1, "science": 2}).to_numpy()
    expected = fit_weights([oof_a[columns].to_numpy(), oof_b[columns].to_numpy()], y, "f1_macro", 42)
    logged = [float(run.data.params[f"weight_{s.info.run_id}"]) for s in (a, b)]
    np.testing.assert_allclose(logged, expected, atol=1e-6)
    assert m["ensemble_f1_macro"] == m["fit_optimized_f1_macro"]
    version = client(cv["env"]).get_model_version_by_alias("optimized", "champion")
    assert version.run_id == run.info.run_id and str(version.version) == "1"


def _post(port: int, body: bytes, content_type="application/json") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_mlflow_models_serve_answers_good_and_malformed_requests(cv):
    assert ensemble(cv, "served", cv["a"], weights="equal").returncode == 0
    with serving(cv["env"], "models:/served@champion", cv["folder"]) as port:
        status, body = _post(port, json.dumps({"dataframe_records": [{"text": t} for t in TEXTS]}).encode())
        assert status == 200, body
        predictions = json.loads(body)["predictions"]
        assert len(predictions) == len(TEXTS)
        assert set(predictions[0]) == {"label", "prob_computers", "prob_politics", "prob_science"}
        assert abs(sum(v for k, v in predictions[0].items() if k.startswith("prob_")) - 1) < 1e-6
        split = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}
        assert json.loads(_post(port, json.dumps(split).encode())[1])["predictions"] == predictions
        status, body = _post(port, ("text\n" + "\n".join(TEXTS)).encode(), "text/csv")
        assert status == 200 and json.loads(body)["predictions"][0]["label"] == predictions[0]["label"]

        for bad in ({"dataframe_records": [{"body": "no text column"}]},
                    {"dataframe_records": [{"text": 42}]},
                    {"dataframe_records": []}):
            status, body = _post(port, json.dumps(bad).encode())
            assert 400 <= status < 500, (bad, status, body)
        assert _post(port, json.dumps({"dataframe_records": [{"text": "still up"}]}).encode())[0] == 200


def test_predict_killed_then_resumed_gives_identical_output(cv, tiny_data, tmp_path):
    assert ensemble(cv, "batch", cv["a"], weights="equal").returncode == 0
    env, folder = cv["env"], cv["folder"]
    args = {"model_uri": "models:/batch@champion", "data": tiny_data, "shard_size": 40}
    reference = run_entrypoint("predict", {**args, "experiment_name": "pred-ref", "output": tmp_path / "ref.csv"},
                               env, folder)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = run_entrypoint("predict", {**args, "experiment_name": "pred"},
                            {**env, "PIPELINES_FAILPOINT": "predict_shard:2"}, folder)
    assert killed.returncode == -signal.SIGKILL
    (run,) = parents(env, "pred", "predict")
    shard0 = Path(run.info.artifact_uri.removeprefix("file://")) / "shards" / "shard-00000.csv"
    stamp = shard0.stat().st_mtime_ns
    resumed = run_entrypoint("predict", {**args, "experiment_name": "pred", "resume": "true",
                                         "output": tmp_path / "out.csv"}, env, folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2/3 shards done" in resumed.stderr
    assert shard0.stat().st_mtime_ns == stamp, "a finished shard was recomputed"
    assert (tmp_path / "out.csv").read_text() == (tmp_path / "ref.csv").read_text()
    assert artifact_text(env, run.info.run_id, "predictions.csv", tmp_path / "a") == (tmp_path / "ref.csv").read_text()
    metrics = parents(env, "pred", "predict")[0].data.metrics
    assert sum(v for k, v in metrics.items() if k.startswith("count_")) == 120
    assert abs(sum(v for k, v in metrics.items() if k.startswith("pct_")) - 100) < 1e-9


def test_retrain_takes_params_and_epochs_from_a_kfold_run(cv, tiny_data, tiny_model):
    env, a = cv["env"], cv["a"]
    proc = run_entrypoint("retrain", {"data": tiny_data, "model": tiny_model, "max_length": 32,
                                      "params_from": a.info.run_id, "experiment_name": "ens"}, env, cv["folder"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = parents(env, "ens", "retrain")
    best = [r.data.metrics["final_best_epoch"] for r in children(env, "ens", a.info.run_id)]
    assert int(run.data.params["epochs"]) == max(1, round(float(np.mean(best))))
    assert float(run.data.params["learning_rate"]) == float(a.data.params["learning_rate"])
    assert run.data.tags["params_source"] == a.info.run_id
    assert "retrain on all 120 rows" in proc.stderr
    assert [f.path for f in client(env).list_artifacts(run.info.run_id, "model")]


def test_missing_member_is_named_or_skipped(cv, tiny_data, tiny_model):
    env, folder = cv["env"], cv["folder"]
    proc = run_entrypoint("train", {"data": tiny_data, "model": tiny_model, "epochs": 1, "max_length": 32,
                                    "experiment_name": "ens"}, env, folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (train,) = parents(env, "ens", "train")
    shutil.rmtree(Path(train.info.artifact_uri.removeprefix("file://")) / "model")
    refused = ensemble(cv, "partial", cv["a"], train, weights="equal")
    assert refused.returncode == 2
    assert f"member run {train.info.run_id}" in refused.stderr and "skip_missing=true" in refused.stderr
    accepted = ensemble(cv, "partial", cv["a"], train, weights="equal", skip_missing="true")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert f"member run {train.info.run_id} skipped" in accepted.stderr
    newest = parents(env, "ens", "ensemble")[-1]
    spec = json.loads(artifact_text(env, newest.info.run_id, "ensemble.json", folder / "s"))
    assert [round(m["weight"], 9) for m in spec["members"]] == [round(1 / 3, 9)] * 3


def test_resume_contract_of_the_ensemble_run(cv, tmp_path, monkeypatch, caplog):
    """resume=false starts anew (naming an unfinished twin); resume=true re-attaches, or refuses listing differences."""
    from pipelines.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cv["env"]["MLFLOW_TRACKING_URI"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    caplog.set_level(logging.INFO, logger="pipelines")
    base = {"source_runs": cv["a"].info.run_id, "registered_model_name": "contract",
            "experiment_name": "ens-contract", "weights": "equal"}
    with Tracker("ens-contract") as tracker:
        def context(**changes):
            cfg = EnsembleConfig(**{**base, **changes})
            inputs = stage.fingerprint_inputs(cfg, sources)
            return contract.StageContext("ensemble", cfg, tracker, inputs, fingerprint(inputs))

        def choose(**changes):
            return contract._choose_parent(context(**changes))

        sources = stage._sources(tracker, EnsembleConfig(**base), tmp_path)
        assert choose(resume=True) is None
        assert "resume=true but experiment ens-contract has no ensemble run to resume" in caplog.text
        ctx = context()
        run_id = contract.open_run("ensemble", ctx.cfg, tracker, ctx.inputs, {}).parent_id  # left RUNNING

        caplog.clear()
        assert choose() is None
        assert f"an unfinished ensemble run {run_id} with the same settings exists" in caplog.text
        assert choose(resume=True).info.run_id == run_id
        assert choose(resume_from=run_id).info.run_id == run_id
        for changes in ({"resume": True, "weights": "score"}, {"resume_from": run_id, "weights": "score"},
                        {"resume": True, "seed": 1}, {"resume": True, "skip_missing": True}):
            with pytest.raises(contract.ResumeError, match=f"cannot resume ensemble run {run_id}") as refused:
                choose(**changes)
            name, value = next((k, v) for k, v in changes.items() if not k.startswith("resume"))
            assert f"{name}: {base.get(name, EnsembleConfig.__dataclass_fields__[name].default)} -> {value}" in str(
                refused.value)
        with pytest.raises(contract.ResumeError, match="is not a parent run of stage ensemble"):
            choose(resume_from=cv["a"].info.run_id)
        tracker.finish(run_id)


def test_ensemble_killed_at_each_step_resumes_to_one_model_one_version_and_the_alias(cv):
    env, exp, name = cv["env"], "ens-resume", "resumed"

    def attempt(failpoint="", **extra):
        return ensemble(cv, name, cv["a"], env={"PIPELINES_FAILPOINT": failpoint} if failpoint else None,
                        **{"weights": "equal", "experiment_name": exp, **extra})

    killed = attempt("ensemble_logged:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run,) = parents(env, exp, "ensemble")
    run_id = run.info.run_id
    assert run.info.status == "RUNNING" and client(env).search_model_versions(f"name = '{name}'") == []

    killed = attempt("ensemble_registered:1", resume="true")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"run {run_id} already logged model" in killed.stderr
    (version,) = client(env).search_model_versions(f"name = '{name}'")
    assert version.run_id == run_id and not client(env).get_registered_model(name).aliases

    refused = attempt(resume="true", weights="score")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"cannot resume ensemble run {run_id}" in refused.stderr and "weights: equal -> score" in refused.stderr

    resumed = attempt(resume="true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"reused version {version.version}" in resumed.stderr
    assert [v.version for v in client(env).search_model_versions(f"name = '{name}'")] == [version.version]
    assert client(env).get_model_version_by_alias(name, "champion").version == version.version
    (run,) = parents(env, exp, "ensemble")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    logged = client(env).search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert len(logged) == 1, "the model was logged again"
    assert all(steps == [0] for steps in metric_steps(env, run_id).values())

    again = attempt(resume="true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"ensemble run {run_id} already finished: nothing to do" in again.stderr
    assert len(client(env).search_model_versions(f"name = '{name}'")) == 1
