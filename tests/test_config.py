"""Config parsing, precedence and fingerprint."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, KFoldConfig, TrainConfig, fingerprint, parse_config


def test_flags_are_typed():
    cfg = parse_config(KFoldConfig, ["--epochs", "2", "--learning_rate", "1e-4", "--resume", "true", "--k_folds", "3"])
    assert (cfg.epochs, cfg.learning_rate, cfg.resume, cfg.k_folds) == (2, 1e-4, True, 3)


def test_mlflow_style_values_parse():
    # mlflow run renders float-typed parameters like "3.0" and booleans like "False"
    cfg = parse_config(KFoldConfig, ["--k_folds", "3.0", "--resume", "False", "--resume_from", ""])
    assert (cfg.k_folds, cfg.resume, cfg.resume_from) == (3, False, "")


def test_precedence_defaults_file_flags_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-3\nepochs: 4\nseed: 7\nbatch_size: 8\n")
    # an explicit flag wins over the file even when it equals the default (epochs=3); an empty one is not given
    cfg = parse_config(TrainConfig, ["--config_file", str(path), "--epochs", "3", "--seed", "",
                                     "--batch_size", "32", "--config", "learning_rate=2e-3"])
    assert (cfg.learning_rate, cfg.epochs, cfg.seed, cfg.batch_size) == (2e-3, 3, 7, 32)


def test_empty_flags_are_not_given(tmp_path):
    # what `mlflow run` passes for every parameter the user did not set
    cfg = parse_config(KFoldConfig, ["--epochs", "", "--resume", "", "--text_column", "", "--k_folds", "4"])
    assert (cfg.epochs, cfg.resume, cfg.text_column, cfg.k_folds) == (3, False, "text", 4)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "two"], "epochs='two' is not a valid int"),
    (["--epochs", "1.5"], "epochs='1.5' is not a valid int"),
    (["--learning_rate", "0"], "learning_rate=0.0 must be positive"),
    (["--k_folds", "1"], "k_folds=1 must be at least 2"),
    (["--metric", "auc"], "metric='auc' is not a classification metric; pass one of f1_macro"),
    (["--task", "summarization", "--label_column", "y"], "label_column is a classification setting"),
    (["--max_new_tokens", "8"], "max_new_tokens is a summarization setting"),
    (["--config", "epoch=3"], "unknown setting 'epoch'"),
    (["--config", "epochs"], "not of the form key=value"),
    (["--config_file", "/nonexistent.yaml"], "config_file /nonexistent.yaml does not exist"),
])
def test_invalid_settings_name_the_setting(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config(KFoldConfig, argv)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"names unknown settings \['lr'\]"):
        parse_config(KFoldConfig, ["--config_file", str(path)])


def test_fingerprint_ignores_settings_that_do_not_change_results():
    base = KFoldConfig()
    same = KFoldConfig(resume=True, resume_from="abc", eval_batch_size=8, logging_steps=1, data="elsewhere.csv",
                       experiment_name="x")
    different = KFoldConfig(learning_rate=1e-4)
    assert fingerprint(base.result_settings()) == fingerprint(same.result_settings())
    assert fingerprint(base.result_settings()) != fingerprint(different.result_settings())
