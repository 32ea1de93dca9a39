"""`task=summarization` through the training stages: a tiny BART built in-process, Korean data, real stores,
real SIGKILL and resume; the BERT warm start, special tokens, generation-only search and `predict`."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_tiny_model, run_entrypoint, store_env
from helpers import artifact_frame, artifact_text, children, client, metric_steps, mlflow_run, parents
from seq2seq_fixtures import make_tiny_bart, make_tiny_distilbert, make_tiny_summaries

from pipelines.rouge import score_rows

pytestmark = pytest.mark.slow

K, EPOCHS, BATCH, ROWS = 3, 2, 8, 60
STEPS = (ROWS - ROWS // K) // BATCH  # optimizer steps per epoch of a fold: 40 training rows
EVAL_BATCHES = 2  # 20 validation rows in generation batches of 16


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    return make_tiny_bart(tmp_path_factory.mktemp("bart"))


@pytest.fixture(scope="module")
def korean(tmp_path_factory):
    return make_tiny_summaries(tmp_path_factory.mktemp("ko") / "ko.jsonl", rows=ROWS, language="ko")


def args_for(data, model, **extra) -> dict:
    args = dict(task="summarization", data=data, text_column="source", target_column="summary", model=model,
                k_folds=K, epochs=EPOCHS, batch_size=BATCH, learning_rate=3e-3, max_source_length=128,
                max_target_length=32, max_new_tokens=12, min_new_tokens=3, num_beams=2, generation_batch_size=16,
                rouge_tokenizer="whitespace", seed=42, experiment_name="sum")
    return {**args, **extra}


def result_folds(env, parent) -> list:
    return [r for r in children(env, "sum", parent.info.run_id) if "fold" in r.data.tags]


def result(env, tmp_path) -> dict:
    (parent,) = parents(env, "sum", "kfold")
    assert parent.info.status == "FINISHED"
    return {"parent": parent, "folds": result_folds(env, parent),
            "oof": artifact_text(env, parent.info.run_id, "oof_predictions.csv", tmp_path / "oof"),
            "cv": {k: v for k, v in parent.data.metrics.items() if k.startswith(("cv_", "fold"))}}


@pytest.fixture(scope="module")
def baseline(bart, korean, tmp_path_factory):
    """An uninterrupted summarization kfold through `mlflow run`."""
    tmp = tmp_path_factory.mktemp("baseline")
    env = store_env(tmp)
    proc = mlflow_run(env, tmp, "kfold", args_for(korean, bart))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return result(env, tmp)


def test_kfold_logs_rouge_per_fold_and_oof_summaries(baseline):
    for name in ("rouge1", "rouge2", "rougeL", "rouge_mean", "gen_len", "loss"):
        assert f"cv_{name}_mean" in baseline["cv"] and f"cv_{name}_std" in baseline["cv"]
    oof = pd.read_csv(io.StringIO(baseline["oof"]), keep_default_na=False, dtype={"generated": str})
    assert list(oof.columns) == ["row_id", "fold", "source", "reference", "generated", "rouge1", "rouge2", "rougeL",
                                 "rouge_mean"]
    assert sorted(oof["row_id"]) == list(range(ROWS)) and oof.groupby("fold").size().tolist() == [20, 20, 20]
    assert (oof["generated"].str.len() > 0).any(), "the model generated nothing at all"
    source = pd.read_json(io.StringIO(open(baseline["parent"].data.params["data"]).read()), lines=True)
    assert (oof["reference"].to_numpy() == source.loc[oof["row_id"], "summary"].to_numpy()).all()
    # per-row ROUGE is the Korean-aware score of the row; each fold's metric is their mean
    again = score_rows(oof["reference"].tolist(), oof["generated"].tolist(), "whitespace")
    assert (again.to_numpy() == oof[["rouge1", "rouge2", "rougeL", "rouge_mean"]].to_numpy()).all()
    for fold, rows in oof.groupby("fold"):
        assert baseline["cv"][f"fold{fold}_rouge_mean"] == pytest.approx(rows["rouge_mean"].mean(), abs=1e-12)
    assert sorted(r.data.tags["fold"] for r in baseline["folds"]) == ["0", "1", "2"]
    assert baseline["parent"].data.params["task"] == "summarization"


def _starts(log: str) -> list[int]:
    return [int(line.split("training starts at step ")[1].split()[0]) for line in log.splitlines()
            if "training starts at step " in line]


@pytest.mark.parametrize("failpoint, starts, finished_at", [
    # fold 1, epoch 2, two steps after its epoch-1 checkpoint: fold 1 continues at that step, fold 2 from 0
    (f"train_step:{EPOCHS * STEPS + STEPS + 2}", [STEPS, 0], None),
    # fold 1's final validation predictions (fold 0: 2 evaluations + its predictions; fold 1: 2 evaluations first):
    # fold 1's last checkpoint says training ended, so it is not trained again, only its predictions are redone
    (f"predict_step:{(EPOCHS + 1) * EVAL_BATCHES + EPOCHS * EVAL_BATCHES + 1}", [0], EPOCHS * STEPS),
], ids=["mid-fold", "during-validation-generation"])
def test_sigkill_and_resume_gives_identical_summaries(baseline, bart, korean, tmp_path, failpoint, starts,
                                                      finished_at):
    env = store_env(tmp_path)
    killed = run_entrypoint("kfold", args_for(korean, bart), {**env, "PIPELINES_FAILPOINT": failpoint}, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (parent,) = parents(env, "sum", "kfold")
    before = {r.data.tags["fold"]: r for r in result_folds(env, parent)}
    assert before["0"].info.status == "FINISHED" and before["1"].info.status == "RUNNING"

    resumed = run_entrypoint("kfold", args_for(korean, bart, resume="true"), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the continuation itself: fold 1 from its checkpoint, fold 2 from scratch, fold 0 not at all
    assert _starts(resumed.stderr) == starts
    if finished_at:
        assert f"training had already stopped at step {finished_at}" in resumed.stderr
    after = result(env, tmp_path)
    folds = {r.data.tags["fold"]: r for r in after["folds"]}
    assert len(after["folds"]) == K and folds["0"].info.end_time == before["0"].info.end_time
    for run in after["folds"]:
        for key, steps in metric_steps(env, run.info.run_id).items():
            assert len(steps) == len(set(steps)), f"duplicate steps of {key}"
    assert after["oof"] == baseline["oof"], "resumed summaries differ from the uninterrupted run"
    assert after["cv"] == baseline["cv"]


def test_group_folds_keep_each_group_on_one_side(korean):
    from pipelines.config import OptunaConfig as KFoldConfig  # both k_folds and validation_fraction
    from pipelines.tasks import get_task

    task = get_task("summarization")
    cfg = KFoldConfig(task="summarization", data=str(korean), text_column="source", target_column="summary",
                      group_column="topic", k_folds=3)
    data = task.load(cfg)
    folds = task.folds(data, cfg)
    assert sorted(i for fold in folds for i in fold) == list(range(len(data)))
    groups = [set(data.frame["group"].iloc[fold]) for fold in folds]
    for i in range(K):
        for j in range(i + 1, K):
            assert not groups[i] & groups[j], f"a topic is split between folds {i} and {j}"
    plain_cfg = KFoldConfig(**{**cfg.to_dict(), "group_column": ""})
    plain_data = task.load(plain_cfg)
    plain = task.folds(plain_data, plain_cfg)
    assert any(len(set(data.frame["group"].iloc[a]) & set(data.frame["group"].iloc[b])) for a in plain for b in plain
               if a is not b), "without group_column, plain KFold splits some topic (the check above can fail)"
    holdout = task.holdout(data, cfg)
    valid_groups = set(data.frame["group"].iloc[holdout])
    assert not valid_groups & set(data.frame["group"].drop(index=holdout))


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    """English summaries of "dialogues" whose speaker tags must stay whole tokens."""
    path = make_tiny_summaries(tmp_path_factory.mktemp("en") / "en.jsonl", rows=40, language="en")
    frame = pd.read_json(path, lines=True)
    frame["source"] = "#Person1#: " + frame["source"] + " #Person2#: ok."
    frame["summary"] = "#Person1# " + frame["summary"]
    frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


@pytest.fixture(scope="module")
def warm_started(dialogues, tmp_path_factory):
    """`train` from an encoder-only BERT folder (warm-started encoder-decoder) with special tokens."""
    tmp = tmp_path_factory.mktemp("warm")
    env = store_env(tmp)
    bert = make_tiny_model(tmp / "bert")
    args = args_for(dialogues, bert, epochs=1, special_tokens="#Person1#,#Person2#", validation_fraction=0.25)
    del args["k_folds"]
    proc = run_entrypoint("train", args, env, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = parents(env, "sum", "train")
    return {"env": env, "tmp": tmp, "run": run, "log": proc.stderr}


def test_encoder_only_checkpoint_is_warm_started_and_special_tokens_survive(warm_started, tmp_path):
    import mlflow
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, EncoderDecoderModel

    run, env = warm_started["run"], warm_started["env"]
    assert "warm-started an encoder-decoder" in warm_started["log"]
    assert {"final_rouge_mean", "final_gen_len", "final_loss"} <= set(run.data.metrics)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model", dst_path=str(tmp_path))
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    assert isinstance(model, EncoderDecoderModel)
    assert tokenizer.tokenize("#Person1#: hi #Person2#")[0] == "#Person1#"
    assert "#Person2#" in tokenizer.tokenize("#Person1#: hi #Person2#")
    assert model.encoder.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.generation_config.num_beams == 2 and model.generation_config.max_new_tokens == 12
    from pipelines.generation import decode

    ids = tokenizer("#Person1# likes tea", add_special_tokens=True)["input_ids"]
    assert decode(tokenizer, [ids])[0] == ["#Person1# likes tea"]  # the speaker tag is text, [CLS]/[SEP] are not


def test_predict_generates_summaries_and_resumes_by_shard(warm_started, dialogues, tmp_path):
    env, run_id = warm_started["env"], warm_started["run"].info.run_id
    args = {"model_uri": f"runs:/{run_id}/model", "data": dialogues, "text_column": "source", "shard_size": 15,
            "experiment_name": "pred"}
    killed = run_entrypoint("predict", args, {**env, "PIPELINES_FAILPOINT": "predict_shard:1"}, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (parent,) = parents(env, "pred", "predict")
    shard0 = client(env).list_artifacts(parent.info.run_id, "shards")
    assert [a.path for a in shard0] == ["shards/shard-00000.csv", "shards/shard-00000.json"]
    first = Path(parent.info.artifact_uri.removeprefix("file://")) / "shards" / "shard-00000.csv"
    written = first.stat().st_mtime_ns

    resumed = run_entrypoint("predict", {**args, "resume": "true"}, env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming predict run {parent.info.run_id}: 1/3 shards done" in resumed.stderr
    assert first.stat().st_mtime_ns == written, "the finished shard was generated again"
    fresh = run_entrypoint("predict", {**args, "experiment_name": "pred2"}, env, tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (other,) = parents(env, "pred2", "predict")
    got = artifact_frame(env, parent.info.run_id, "predictions.csv", tmp_path / "a")
    want = artifact_frame(env, other.info.run_id, "predictions.csv", tmp_path / "b")
    assert list(got.columns) == ["row_id", "generated"] and len(got) == 40
    assert got.equals(want)
    settings = json.loads(artifact_text(env, parent.info.run_id, "config.json", tmp_path / "c"))["settings"]
    # the generation settings used are the ones the model was trained and validated with, recorded
    assert (settings["num_beams"], settings["max_new_tokens"], settings["max_length"]) == (2, 12, 128)


def test_generation_only_search_scores_a_fixed_model_without_training(warm_started, dialogues, tmp_path):
    env, run_id = warm_started["env"], warm_started["run"].info.run_id
    space = "{num_beams: {type: int, low: 1, high: 2}, length_penalty: {type: float, low: 0.5, high: 2.0}}"
    args = args_for(dialogues, f"runs:/{run_id}/model", objective="generate", search_space=space, n_trials=3,
                    special_tokens="#Person1#,#Person2#", experiment_name="gen", validation_fraction=0.25)
    for key in ("k_folds", "epochs", "batch_size", "learning_rate"):
        del args[key]
    proc = run_entrypoint("optuna_search", args, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training starts" not in proc.stderr, "objective=generate must not train"
    (parent,) = parents(env, "gen", "optuna")
    trials = children(env, "gen", parent.info.run_id)
    assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials)
    for trial in trials:
        assert "final_rouge_mean" in trial.data.metrics and not client(env).list_artifacts(trial.info.run_id,
                                                                                          "checkpoints")
        assert trial.data.metrics["objective"] == trial.data.metrics["final_rouge_mean"]
    best = json.loads(artifact_text(env, parent.info.run_id, "best_params.json", tmp_path / "b"))
    assert set(best) == {"num_beams", "length_penalty"}


def test_optuna_holdout_and_retrain_train_summarizers(bart, korean, tmp_path):
    env = store_env(tmp_path)
    # greedy search with a beam-only setting left over (transformers refuses that combination as such)
    args = args_for(korean, bart, epochs=1, n_trials=2, experiment_name="hp", num_beams=1, length_penalty=2.0,
                    search_space="{learning_rate: {type: float, low: 1.0e-3, high: 5.0e-3, log: true}}")
    del args["k_folds"]
    proc = run_entrypoint("optuna_search", args, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (search,) = parents(env, "hp", "optuna")
    assert search.data.metrics["best_value"] >= 0 and search.info.status == "FINISHED"
    retrain = {k: v for k, v in args.items() if k not in ("n_trials", "search_space", "epochs")}
    proc = run_entrypoint("retrain", {**retrain, "params_from": search.info.run_id, "epochs": 1}, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (model_run,) = parents(env, "hp", "retrain")
    assert model_run.data.params["task"] == "summarization"
    assert model_run.data.tags["params_source"] == search.info.run_id
    names = [a.path for a in client(env).list_artifacts(model_run.info.run_id, "model")]
    assert "model/generation_config.json" in names


@pytest.mark.parametrize("case, change, expected", [
    ("missing target column", {"target_column": "abstract"}, ["no column 'abstract' (target_column)",
                                                              "Pass target_column=<one of them>"]),
    ("empty target column", {"target_column": "empty"}, ["no row has all of 'source', 'empty' filled in",
                                                         "Check text_column, target_column"]),
    ("classification setting", {"label_column": "topic"}, ["label_column is a classification setting",
                                                           "pass task=classification"]),
    ("default rouge on Hangul", {"rouge_tokenizer": "default"}, ["rouge_tokenizer=default keeps only a-z",
                                                                 "Pass rouge_tokenizer=whitespace"]),
    ("encoder without decoder form", {"model": "distilbert"}, ["(distilbert) can neither generate text",
                                                               "for task=summarization"]),
])
def test_bad_summarization_input_exits_2_naming_the_fix(case, change, expected, bart, korean, tmp_path):
    env = store_env(tmp_path)
    frame = pd.read_json(korean, lines=True).assign(empty="")
    data = tmp_path / "data.jsonl"
    frame.to_json(data, orient="records", lines=True, force_ascii=False)
    if change.get("model") == "distilbert":
        change = {"model": make_tiny_distilbert(tmp_path / "distilbert")}
    proc = run_entrypoint("kfold", {**args_for(data, bart), **change}, env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for text in expected:
        assert text in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_with_a_folder_not_trained_here_needs_its_lengths_and_records_them(bart, korean, tmp_path):
    env = store_env(tmp_path)
    args = {"model_uri": bart, "data": korean, "text_column": "source", "experiment_name": "raw"}
    refused = run_entrypoint("predict", args, env, tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "records no max_new_tokens" in refused.stderr and "pass max_new_tokens=N" in refused.stderr
    refused = run_entrypoint("predict", {**args, "max_new_tokens": 8}, env, tmp_path)
    assert refused.returncode == 2 and "pass max_length=N" in refused.stderr, refused.stderr[-2000:]
    proc = run_entrypoint("predict", {**args, "max_new_tokens": 8, "min_new_tokens": 2, "max_length": 64}, env,
                          tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = parents(env, "raw", "predict")
    settings = json.loads(artifact_text(env, run.info.run_id, "config.json", tmp_path / "c"))["settings"]
    # the values used, none left unknown: the model's unset ones are transformers' defaults
    assert {k: settings[k] for k in ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty",
                                     "repetition_penalty", "no_repeat_ngram_size", "max_length")} == {
        "max_new_tokens": 8, "min_new_tokens": 2, "num_beams": 1, "length_penalty": 1.0, "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0, "max_length": 64}
