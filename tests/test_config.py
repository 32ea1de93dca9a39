"""Config parsing, precedence and fingerprint."""

from __future__ import annotations

import pytest

from pipelines.config import KFoldConfig, TrainConfig
from pipelines.errors import ConfigError
from pipelines.settings import fingerprint, parse_config


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


VARIANTS = """\
learning_rate: 1.0e-4
epochs: 3
variant: small
variants:
  small: {batch_size: 8, max_length: 64}
  large: {batch_size: 4, max_length: 256, learning_rate: 2.0e-5, ema_decay: 0.999}
"""


def test_variant_from_yaml_with_config_override(tmp_path):
    path = tmp_path / "variants.yaml"
    path.write_text(VARIANTS)
    # defaults < the file's top level < the variant < flags < --config
    cfg = parse_config(TrainConfig, ["--config_file", str(path), "--variant", "large", "--max_length", "128",
                                     "--config", "learning_rate=3e-5"])
    assert (cfg.variant, cfg.batch_size, cfg.max_length, cfg.learning_rate, cfg.ema_decay, cfg.epochs) == \
        ("large", 4, 128, 3e-5, 0.999, 3)
    default = parse_config(TrainConfig, ["--config_file", str(path)])  # the file's own `variant:`
    assert (default.variant, default.batch_size, default.max_length, default.learning_rate) == ("small", 8, 64, 1e-4)
    chosen = parse_config(TrainConfig, ["--config_file", str(path), "--config", "variant=large"])
    assert chosen.batch_size == 4
    # the name is a label (a tag), the settings it resolves to are what the fingerprint sees
    named = parse_config(TrainConfig, ["--config_file", str(path), "--variant", "large"])
    plain = parse_config(TrainConfig, ["--batch_size", "4", "--max_length", "256", "--learning_rate", "2e-5",
                                       "--ema_decay", "0.999", "--epochs", "3"])
    assert fingerprint(named.result_settings()) == fingerprint(plain.result_settings())


@pytest.mark.parametrize("argv, message", [
    (["--variant", "huge"], "variant='huge' is not in config_file .* its variants are small, large"),
    (["--variant", "small", "--config_file", ""], "no config_file was given"),
    (["--ema_decay", "1.5"], "ema_decay=1.5 must be in \\(0, 1\\)"),
    (["--swa_epochs", "5", "--epochs", "3"], "swa_epochs=5"),
    (["--ema_decay", "0.9", "--swa_epochs", "1"], "cannot be combined with ema_decay"),
    (["--layerwise_lr_decay", "0"], "layerwise_lr_decay=0.0"),
    (["--loss", "focal", "--label_smoothing", "0.1"], "label_smoothing"),
    (["--init_epoch", "continue"], "init_epoch and init_ema only apply with init_from"),
    (["--task", "mlm", "--loss", "focal"], "loss is a classification setting"),
    (["--task", "mlm", "--label_smoothing", "0.1"], "label_smoothing is a"),
    (["--class_weights", "balanced", "--label_smoothing", "0.1"], "do not smooth labels"),
    (["--focal_gamma", "1.0"], "focal_gamma=1.0 only applies with loss=focal"),
])
def test_invalid_techniques_and_variants_are_refused(tmp_path, argv, message):
    path = tmp_path / "variants.yaml"
    path.write_text(VARIANTS)
    argv = ["--config_file", str(path), *argv] if "--config_file" not in argv else argv
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, argv)


def test_recorded_settings_hide_the_storage_password():
    cfg = KFoldConfig(optuna_storage="postgresql+psycopg2://team:s3cret@db:5432/optuna")
    record = cfg.to_record()
    assert "s3cret" not in str(record) and record["optuna_storage"].startswith("postgresql+psycopg2://team:***@db")
    assert cfg.optuna_storage.endswith("s3cret@db:5432/optuna")  # the stage itself still connects with it
