"""Settings at the edges (issue 19, items 2, 17 and 19): precedence and provenance of settings, credentials in
``base_url``, and refusals that must come before any run exists.

Everything runs in-process against a real SQLite tracking store in ``tmp_path``: the "source search" a later
stage takes its parameters from is recorded through the project's own tracking layer (``open_stage``, as the
optuna stage records itself), never trained.
"""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from pipelines.config import (
    CorrectConfig,
    KFoldConfig,
    LlmConfig,
    OptunaConfig,
    PredictConfig,
    TrainConfig,
    ValidateConfig,
)
from pipelines.data import Dataset
from pipelines.errors import ConfigError
from pipelines.models import ModelSource
from pipelines.settings import parse_config

SECRET = "sk-EDGE-SECRET-1234567890"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One SQLite tracking store for the module (creating a store takes seconds; each test has its experiment),
    for in-process stages and ``pipelines`` commands."""
    folder = tmp_path_factory.mktemp("edges")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "PIPELINES_FAILPOINT"):
            patch.delenv(key, raising=False)
        patch.chdir(folder)
        yield folder


def _opened(stage: str, cfg, experiment: str, model: ModelSource | None = None, finish: bool = True):
    """Open (and finish) a parent run of ``stage`` for ``cfg`` as the stage itself would: (context, config.json)."""
    from pipelines.stages.contract import open_stage, recorded
    from pipelines.tracking import Tracker

    data = Dataset(frame=pd.DataFrame({"row_id": [0], "text": ["x"]}), labels=[], digest="data-digest")
    with Tracker(experiment) as tracker:
        ctx = open_stage(stage, cfg, data, model or ModelSource("tiny", "tiny", "model-digest"), tracker)
        if finish:
            tracker.finish(ctx.parent_id)
        return ctx, recorded(tracker, ctx.parent_id)


def _stage_runs(experiment: str, stage: str) -> list:
    from pipelines.tracking import Tracker

    with Tracker(experiment) as tracker:
        return tracker.parent_runs(stage)


# ---------------------------------------------------------------- item 2: precedence and settings_source


def test_explicit_settings_beat_params_from_which_beats_the_config_file(tracking, monkeypatch, capsys):
    """explicit -P / config > params_from (searched parameters only) > variant > config_file > defaults; every
    setting's origin in config.json's settings_source and in `pipelines compare`."""
    from pipelines.manage import main as pipelines
    from pipelines.stages.contract import BEST_PARAMS_ARTIFACT, upload_json
    from pipelines.tracking import Tracker

    space = ("{learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}, "
             "batch_size: {type: categorical, choices: [8, 64]}, max_length: {type: int, low: 32, high: 256}}")
    search = parse_config(OptunaConfig, ["--experiment_name", "edge", "--search_space", space,
                                         "--weight_decay", "0.05", "--warmup_ratio", "0.1", "--seed", "7"])
    source, _ = _opened("optuna", search, "edge", finish=False)
    with Tracker("edge") as tracker:  # what the search found (best_params.json holds the searched ones only)
        upload_json(tracker, source.parent_id, BEST_PARAMS_ARTIFACT,
                    {"learning_rate": 1e-3, "batch_size": 64, "max_length": 256})
        tracker.finish(source.parent_id)

    file = tracking / "settings.yaml"
    file.write_text("learning_rate: 5.0e-4\nweight_decay: 0.01\nbatch_size: 4\nvariants:\n  short: {epochs: 2}\n")
    argv = ["--config_file", str(file), "--variant", "short", "--params_from", "latest", "--experiment_name", "edge",
            "--max_length", "128",  # the default, given explicitly: still explicit
            "--config", "batch_size=32"]
    cfg = parse_config(KFoldConfig, argv)
    ctx, record = _opened("kfold", cfg, "edge")

    used = ctx.cfg
    assert (used.batch_size, used.max_length) == (32, 128), "explicit -P and config= must beat params_from"
    assert used.learning_rate == 1e-3, "params_from must beat config_file"
    assert (used.weight_decay, used.warmup_ratio, used.seed) == (0.01, 0.0, 42), \
        "the search's fixed settings are not what it searched: they must not be brought"
    assert used.epochs == 2 and used.params_from == source.parent_id
    assert record["settings"]["batch_size"] == 32 and record["settings"]["learning_rate"] == 1e-3
    origin = record["settings_source"]
    assert {name: origin[name] for name in ("batch_size", "max_length", "learning_rate", "weight_decay", "epochs",
                                            "warmup_ratio", "params_from", "variant")} == {
        "batch_size": "explicit", "max_length": "explicit", "learning_rate": "params_from",
        "weight_decay": "config_file", "epochs": "variant", "warmup_ratio": "default", "params_from": "explicit",
        "variant": "explicit"}
    assert set(origin) == set(record["settings"]), "every setting's origin is recorded"
    assert "settings_source" not in ctx.inputs and "settings_source" not in record["settings"]

    pipelines(["compare", source.parent_id, ctx.parent_id, "--csv", str(tracking / "c.csv")])
    out = capsys.readouterr().out
    frame = pd.read_csv(tracking / "c.csv", index_col="run_id")
    row = frame.loc[ctx.parent_id]
    assert (row["source.learning_rate"], row["source.batch_size"], row["source.weight_decay"],
            row["source.epochs"]) == ("params_from", "explicit", "config_file", "variant")
    assert frame.loc[source.parent_id, "source.weight_decay"] == "explicit"
    assert "source.learning_rate" in out and "params_from" in out


def test_settings_source_is_provenance_not_a_result_setting():
    """The same values reached by another route have the same fingerprint inputs (old runs still resume)."""
    explicit = parse_config(KFoldConfig, ["--epochs", "3", "--seed", "42"])
    default = parse_config(KFoldConfig, [])
    assert explicit.settings_source["seed"] == "explicit" and default.settings_source["seed"] == "default"
    assert explicit.result_settings() == default.result_settings() == KFoldConfig().result_settings()
    assert explicit.to_record() == default.to_record()


# ---------------------------------------------------------------- item 17: credentials inside base_url


def test_base_url_credentials_never_reach_params_config_or_fingerprint(tracking, monkeypatch):
    from pipelines.settings import fingerprint
    from pipelines.stages.llm import endpoint
    from pipelines.tracking import Tracker

    monkeypatch.setenv("EDGE_KEY", "unused")
    url = f"https://team:{SECRET}@llm.example.com/v1?api_key={SECRET}&api-version=2024-06-01"
    cfg = parse_config(LlmConfig, ["--base_url", url, "--llm_model", "m", "--api_key_env", "EDGE_KEY",
                                   "--experiment_name", "llm"])
    ctx, record = _opened("llm", cfg, "llm", model=endpoint(cfg))
    with Tracker("llm") as tracker:
        run = tracker.get_run(ctx.parent_id)
    recorded_text = json.dumps([record, run.data.params, run.data.tags, ctx.inputs])
    assert SECRET not in recorded_text
    assert run.data.params["base_url"] == "https://***@llm.example.com/v1?api_key=***&api-version=2024-06-01"
    rotated = parse_config(LlmConfig, ["--base_url", url.replace(SECRET, "sk-other"), "--llm_model", "m",
                                       "--api_key_env", "EDGE_KEY"])
    assert rotated.result_settings() == cfg.result_settings(), "a new key is not a new experiment"

    plain = LlmConfig(base_url="https://api.upstage.ai/v1", llm_model="m", api_key_env="EDGE_KEY")
    assert plain.to_record()["base_url"] == plain.result_settings()["base_url"] == "https://api.upstage.ai/v1"
    assert endpoint(plain).digest == "https://api.upstage.ai/v1#m"  # unchanged: existing runs still resume
    assert fingerprint(plain.result_settings()) == fingerprint({**plain.result_settings(), "base_url": plain.base_url})


# ---------------------------------------------------------------- item 19: refused before any run exists


def _llm_args() -> list[str]:
    return ["--correction_strategy", "llm", "--base_url", "http://127.0.0.1:9/v1", "--llm_model", "m",
            "--api_key_env", "EDGE_KEY", "--max_retries", "0", "--request_timeout", "2"]


def test_unknown_placeholders_in_correction_prompt_are_refused_at_parse(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_KEY", "unused")
    base = ["--predictions_from", "0" * 32, *_llm_args()]
    with pytest.raises(ConfigError, match=r"correction_prompt names \{sumary\}"):
        parse_config(CorrectConfig, [*base, "--correction_prompt", "Fix this summary: {sumary}\n\n{text}"])
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Text: {text}\nSummary: {summary}\nAnswer in {language}.", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"correction_prompt names \{language\}"):
        parse_config(CorrectConfig, [*base, "--correction_prompt", str(prompt)])
    parse_config(CorrectConfig, base)  # the default prompt is fine


@pytest.mark.parametrize("cls, argv", [
    (TrainConfig, ["--task", "summarization"]),
    (ValidateConfig, ["--task", "summarization", "--predictions_from", "0" * 32]),
    (CorrectConfig, ["--predictions_from", "0" * 32, "--correction_models", "m"]),
])
def test_morpheme_rouge_without_kiwipiepy_is_refused_at_parse(cls, argv, monkeypatch):
    monkeypatch.setitem(sys.modules, "kiwipiepy", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"rouge_tokenizer=morpheme needs kiwipiepy.*pip install"):
        parse_config(cls, [*argv, "--rouge_tokenizer", "morpheme"])


def test_default_rouge_on_korean_is_refused_by_correct_before_any_run(tracking, monkeypatch):
    """The data is checked once, at load, before any run or LLM request; the message names the column."""
    from pipelines.stages import correct
    from pipelines.stages.common import upload_frame
    from pipelines.stages.contract import upload_json
    from pipelines.tracking import Tracker

    monkeypatch.setenv("EDGE_KEY", "unused")
    korean = pd.DataFrame({"row_id": [0, 1], "source": ["고객이 환불을 요청했다. 상담원이 확인했다.",
                                                        "배송이 늦어 고객이 항의했다."],
                           "generated": ["고객이 환불을 요청했다.", "배송 지연 항의."],
                           "reference": ["고객 환불 요청.", "배송 지연으로 항의."]})
    with Tracker("fix") as tracker:  # a finished train run of a Korean summarizer, as the train stage records it
        source = tracker.start_parent("train", "f" * 16, {})
        upload_json(tracker, source, "config.json", {"settings": {"task": "summarization", "text_column": "text"}})
        upload_frame(tracker, source, "predictions.csv", korean)
        tracker.finish(source)
    cfg = parse_config(CorrectConfig, ["--predictions_from", source, "--rouge_tokenizer", "default",
                                       "--experiment_name", "fix", *_llm_args()])
    with pytest.raises(ConfigError, match=r"rouge_tokenizer=default.*the source texts \(text_column 'text'\)"):
        correct.run(cfg)
    assert _stage_runs("fix", "correct") == [], "refused after a run was created"


def test_search_space_letting_min_new_tokens_exceed_max_new_tokens_is_refused_before_any_run(tracking):
    from pipelines.stages import search

    space = "{max_new_tokens: {type: int, low: 4, high: 64}, learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3}}"
    cfg = parse_config(OptunaConfig, ["--task", "summarization", "--min_new_tokens", "10", "--search_space", space,
                                      "--experiment_name", "hpo", "--data", str(tracking / "missing.jsonl")])
    with pytest.raises(ConfigError, match=r"search_space allows trials that would fail \(min_new_tokens=10 exceeds "
                                          r"max_new_tokens=4.*\), e\.g\. max_new_tokens=4:"):
        search.run(cfg)
    assert _stage_runs("hpo", "optuna") == []
    both = "{min_new_tokens: {type: int, low: 0, high: 20}, max_new_tokens: {type: categorical, choices: [16, 64]}}"
    with pytest.raises(ConfigError, match=r"min_new_tokens=20 exceeds max_new_tokens=16"):
        search.run(parse_config(OptunaConfig, ["--task", "summarization", "--search_space", both]))


@pytest.mark.parametrize("cls", [PredictConfig, ValidateConfig])
def test_min_new_tokens_above_max_new_tokens_is_refused_in_predict_settings(cls):
    with pytest.raises(ConfigError, match="min_new_tokens=40 exceeds max_new_tokens=20: lower min_new_tokens"):
        parse_config(cls, ["--model_uri", "runs:/x/model", "--min_new_tokens", "40", "--max_new_tokens", "20"])
    parse_config(cls, ["--model_uri", "runs:/x/model", "--min_new_tokens", "40"])  # 0: the model's own


def test_redaction_keeps_the_other_query_values_as_written():
    from pipelines.settings import redact_url

    assert redact_url("https://h/v1?a=b%26c&api_key=s3cret") == "https://h/v1?a=b%26c&api_key=***"
    assert redact_url("https://h/v1?a=b%26c") == "https://h/v1?a=b%26c"
