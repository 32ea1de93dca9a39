"""The settings machinery: a setting is a dataclass field; ``Settings`` checks choices, records where each value came
from and what goes into the fingerprint; ``parse_config`` reads flags, ``--config`` and YAML into a settings class.

One name per setting everywhere: the dataclass field is the command-line flag, the MLproject parameter and the
MLflow param. Values come, lowest precedence first, from the field default, an optional YAML file
(``--config_file``, then its ``variant``), the run named by ``params_from`` (only the parameters its search
searched, applied in pipelines/stages/contract.py), command-line flags and ``--config k=v,...``. A flag given an
empty value is *not given*: every MLproject parameter defaults to ``''`` (the real default is in its description),
so ``mlflow run`` passes untouched parameters as empty and they never hide the file's value, while any explicit
``-P name=value``, even the default, overrides it. Where each value came from is kept in ``settings_source``
(recorded in the run's ``config.json``, not in the fingerprint).

Which task a setting belongs to (a configuration with a ``task`` setting; pipelines/tasks/__init__.py):

- ``setting(..., task="name")``: owned by that task, declared in its pipelines/tasks/<name>/settings.py; it applies
  with ``task=name`` only.
- ``setting(..., shared=True)``: declared once (pipelines/config.py) and used by several tasks; it applies with a
  task whose settings module names it in ``USES``, so a new task opts in without editing another task's file.
- any other setting applies to every task.

A setting that does not apply stays out of the fingerprint, and giving it is refused (``refuse_other_task_settings``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pipelines.errors import ConfigError

ROUGE_TOKENIZERS = ("whitespace", "char", "morpheme", "default")
ROUGE_RULES = "punctuation-split"  # the rules of the whitespace/char/morpheme ROUGE tokenizers
CHANGED_RULES = {  # setting -> (whether a configuration's results depend on the rules, the rules' name)
    # the whitespace, char and morpheme ROUGE tokenizers split punctuation off words
    "rouge_rules": (lambda s: s.get("rouge_tokenizer", "default") != "default", ROUGE_RULES),
    # sampler=grid gives logical trial n grid point n (before: a point drawn per trial, repeating some)
    "grid_rules": (lambda s: s.get("sampler") == "grid", "point-per-trial"),
}  # a task's own rules: CHANGED_RULES of its settings module
SECRET_PARAM = re.compile(r"key|token|secret|passw|sig|auth|credential", re.IGNORECASE)  # query parameter names
REDACTED = ("base_url",)  # URL settings that may carry credentials: recorded and fingerprinted without them


def setting(default: Any, help: str, *, result: bool = True, choices: tuple | None = None,
            task: str | tuple[str, ...] | None = None, shared: bool = False, same_as: str = "") -> Any:
    """A config field. ``result=False`` keeps it out of the fingerprint (it changes how, not what); ``task`` names
    the task owning it, ``shared`` makes it apply to the tasks whose ``USES`` name it (see the module docstring);
    ``same_as``: left out of the fingerprint while it equals that setting (runs from before it existed)."""
    tasks = (task,) if isinstance(task, str) else task
    return field(default=default, metadata={"help": help, "result": result, "choices": choices, "task": tasks,
                                            "shared": shared, "same_as": same_as})


def redact_url(url: str) -> str:
    """``url`` without credentials: its user-info (``https://user:key@host``) and the values of query parameters
    named like a secret (``?api_key=...``) become ``***``. A URL without them is returned unchanged."""
    parts = urllib.parse.urlsplit(url)
    netloc = f"***@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(SECRET_PARAM.search(key) for key, _ in pairs):
            query = urllib.parse.urlencode([(key, "***" if SECRET_PARAM.search(key) else value) for key, value in pairs],
                                           safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def redact(url: str) -> str:
    """A database (SQLAlchemy) URL with any password removed."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show only its scheme
        return url.split("://", 1)[0] + "://..."


@dataclass
class Settings:
    """Behaviour shared by every stage's settings: choice checks, fingerprint inputs, a plain dict, and where
    each value came from (``settings_source``: per setting ``default``, ``config_file``, ``variant``,
    ``params_from`` or ``explicit``; provenance only, never in the fingerprint)."""

    settings_source: dict[str, str] = field(default_factory=dict, repr=False, compare=False, metadata={
        "help": "", "result": False, "provenance": True})
    # set by pipelines/config.py, which composes the configurations from the tasks' settings modules (this module
    # knows no task): shared setting -> the tasks whose USES name it; task -> its own CHANGED_RULES
    shared_owners: ClassVar[dict[str, tuple[str, ...]]] = {}
    task_rules: ClassVar[dict[str, dict]] = {}

    def __post_init__(self) -> None:
        for f in settings_fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(map(str, choices))}")
        # built in Python rather than parsed: a value other than the default was given
        self.settings_source = {f.name: self.settings_source.get(f.name) or (
            "default" if getattr(self, f.name) == f.default else "explicit") for f in settings_fields(self)}
        if getattr(self, "rouge_tokenizer", "") == "morpheme" and importlib.util.find_spec("kiwipiepy") is None:
            raise ConfigError("rouge_tokenizer=morpheme needs kiwipiepy, which is not installed: pip install "
                              "'pipelines[korean]' (or pip install kiwipiepy), or pass rouge_tokenizer=whitespace or "
                              "char")

    def result_settings(self) -> dict[str, Any]:
        """The settings that change results (the fingerprint's inputs, besides data and model digests)."""
        settings = {f.name: self._redacted(f.name) for f in settings_fields(self)
                    if f.metadata["result"] and self.applies(f) and not self._same(f)}
        # rules that changed results of these settings in this version: a run made by the old rules is refused on
        # resume (listing e.g. rouge_rules: <unset> -> punctuation-split) rather than mixing the two
        rules = {**CHANGED_RULES, **self.task_rules.get(getattr(self, "task", None), {})}
        settings.update({name: value for name, (uses, value) in rules.items() if uses(settings)})
        return settings

    def _same(self, f: dataclasses.Field) -> bool:
        """Whether ``f`` equals the setting its ``same_as`` names (then it is left out of the fingerprint)."""
        return bool(f.metadata.get("same_as")) and getattr(self, f.name) == getattr(self, f.metadata["same_as"])

    def _redacted(self, name: str) -> Any:
        value = getattr(self, name)
        return redact_url(value) if name in REDACTED and value else value

    def applies(self, f: dataclasses.Field) -> bool:
        """Whether setting ``f`` applies with this configuration's task (see the module docstring)."""
        owners = self._owners(f)
        return owners is None or getattr(self, "task", None) in owners

    def refuse_other_task_settings(self) -> None:
        """A setting of another task would be silently ignored: refuse it, naming the tasks it belongs to."""
        for f in settings_fields(self):
            if not self.applies(f) and getattr(self, f.name) != f.default:
                owners = self._owners(f)
                raise ConfigError(f"{f.name} is a {' or '.join(owners)} setting and does nothing with "
                                  f"task={self.task}; remove it, or pass task={owners[0]}")

    def _owners(self, f: dataclasses.Field) -> tuple[str, ...] | None:
        """The tasks setting ``f`` belongs to; None: every task."""
        return self.shared_owners[f.name] if f.metadata.get("shared") else f.metadata.get("task")

    def to_dict(self) -> dict[str, Any]:
        """The settings by name (``settings_source`` left out: it says where they came from)."""
        return {f.name: getattr(self, f.name) for f in settings_fields(self)}

    def to_record(self) -> dict[str, Any]:
        """The settings as runs record them (params, ``config.json``): a database URL's password and a URL's
        credentials removed."""
        record = {name: self._redacted(name) for name in self.to_dict()}
        if record.get("optuna_storage"):
            record["optuna_storage"] = redact(record["optuna_storage"])
        return record


def wire_tasks(common: type[Settings], modules: dict[str, Any]) -> None:
    """Tell the machinery which tasks use each ``shared`` setting of ``common`` (their settings modules' ``USES``)
    and each task's own ``CHANGED_RULES`` (pipelines/config.py calls it with the registered tasks' modules). A
    registry whose modules do not fit together is refused (a USES naming no shared setting, a shared setting no
    task uses, a setting declared by two tasks): it would silently drop a setting from fingerprints."""
    shared = {f.name for f in dataclasses.fields(common) if f.metadata.get("shared")}
    for name, module in modules.items():
        if unknown := set(module.USES) - shared:
            raise TypeError(f"pipelines/tasks/{name}/settings.py: USES names {sorted(unknown)}, which are not shared "
                            f"settings ({sorted(shared)})")
    owners = {field: tuple(n for n, m in modules.items() if field in m.USES) for field in shared}
    if unused := sorted(field for field, tasks in owners.items() if not tasks):
        raise TypeError(f"shared settings {unused} are used by no task (USES of pipelines/tasks/*/settings.py)")
    for kind in ("Training", "Scoring", "Prediction"):
        declared = [name for m in modules.values() if hasattr(m, kind) for name in getattr(m, kind).__annotations__]
        if twice := sorted({name for name in declared if declared.count(name) > 1}):
            raise TypeError(f"{kind} settings {twice} are declared by two tasks; declare each in one task's module")
    Settings.shared_owners = owners
    Settings.task_rules = {name: getattr(m, "CHANGED_RULES", {}) for name, m in modules.items()}


def settings_fields(settings: Settings | type[Settings]) -> list[dataclasses.Field]:
    """The settings of a configuration (its dataclass fields, ``settings_source`` excepted)."""
    return [f for f in dataclasses.fields(settings) if not f.metadata.get("provenance")]


def fingerprint(inputs: dict[str, Any]) -> str:
    """Stable short hash of the result-affecting settings (plus data and model digests)."""
    payload = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of settings that differ, e.g. ``learning_rate: 2e-05 -> 0.0001``."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys if old.get(k) != new.get(k)]


# ---------------------------------------------------------------- parsing


def convert_value(name: str, raw: Any, target: Any) -> Any:
    """Convert a raw string (or YAML scalar) to the type of the field default ``target``."""
    kind = type(target)
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "y", "on"):
                return True
            if lowered in ("false", "0", "no", "n", "off", ""):
                return False
            raise ValueError
        if kind is int:
            number = float(text)
            if number != int(number):
                raise ValueError
            return int(number)
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {kind.__name__}") from None


def _parse_overrides(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"--config entry {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def parse_config(cls: type[Settings], argv: list[str] | None = None) -> Settings:
    """Parse command-line arguments into ``cls``; every setting is a ``--name`` flag. Each value's origin is
    recorded in ``settings_source``: a flag or ``--config`` entry is ``explicit`` even when it equals the default."""
    fields = {f.name: f for f in settings_fields(cls)}
    parser = argparse.ArgumentParser(description=cls.__doc__)
    for f in fields.values():
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(choices)}." if choices else ""
        parser.add_argument(f"--{f.name}", default=None, help=f"{f.metadata['help']}{extra} (default: {f.default!r})")
    parser.add_argument("--config_file", default="", help="YAML file mapping setting names to values.")
    parser.add_argument("--config", default="", help="Overrides as k=v,k=v (highest precedence).")
    args = vars(parser.parse_args(argv))
    config_file, overrides = args.pop("config_file"), _parse_overrides(args.pop("config"))

    layers: list[tuple[str, dict[str, Any]]] = []  # (source, values), lowest precedence first
    variant = overrides.get("variant") or args.get("variant") or ""
    if config_file:
        top, chosen = _load_yaml(Path(config_file), fields, variant)
        layers += [("config_file", top), ("variant", chosen)]
    elif variant:
        raise ConfigError(f"variant={variant!r} names a variant of config_file, but no config_file was given; pass "
                          "config_file=<YAML with a `variants:` mapping>")
    for name in overrides:
        if name not in fields:
            raise ConfigError(f"--config names unknown setting {name!r}; known: {', '.join(fields)}")
    given = {name: raw for name, raw in args.items() if raw is not None and raw != ""}  # '': not given (MLproject)
    layers.append(("explicit", {**given, **overrides}))
    values: dict[str, Any] = {}
    sources = dict.fromkeys(fields, "default")
    for source, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    converted = {name: convert_value(name, raw, fields[name].default) for name, raw in values.items()}
    return cls(**converted, settings_source=sources)


def _load_yaml(path: Path, fields: dict[str, dataclasses.Field], variant: str = ""
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The file's top-level settings, and those of ``variants[variant]`` (applied over them)."""
    if not path.is_file():
        raise ConfigError(f"config_file {path} does not exist; pass the path of a YAML mapping of settings")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config_file {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config_file {path} must hold a mapping of setting: value")
    variants = loaded.pop("variants", None) or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError(f"config_file {path}: `variants` must map each variant name to a mapping of settings")
    variant = variant or str(loaded.get("variant") or "")  # the file may name its default variant
    if variant:
        if "variant" not in fields:
            raise ConfigError(f"variant={variant!r}: this stage has no variants; remove it")
        if variant not in variants:
            raise ConfigError(f"variant={variant!r} is not in config_file {path}; its variants are "
                              f"{', '.join(map(str, variants)) or 'none'}")
    chosen = variants[variant] if variant else {}
    unknown = sorted((set(loaded) | set(chosen)) - set(fields))
    if unknown:
        raise ConfigError(f"config_file {path} names unknown settings {unknown}; known: {', '.join(fields)}")
    return loaded, chosen


# ---------------------------------------------------------------- what every stage's settings have


@dataclass
class Resumable(Settings):
    """Where a stage's runs go and how it continues one."""

    experiment_name: str = setting("", "MLflow experiment; empty uses MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID "
                                   "or 'Default'.", result=False)
    resume: bool = setting(False, "Continue the newest run of this stage with the same settings.", result=False)
    resume_from: str = setting("", "Run id of a parent run of this stage to continue explicitly.", result=False)


@dataclass
class Coordinated(Settings):
    """Settings of a stage whose units are leased, so that several workers can share it."""

    optuna_storage: str = setting(
        "", "Database (SQLAlchemy URL) holding Optuna studies and the leases through which workers share units; "
        "empty: optuna.db beside the embedded SQLite tracking store (required with any other tracking store).",
        result=False,
    )
    heartbeat_interval: int = setting(10, "Seconds between heartbeats of a unit's lease (and an Optuna trial's).",
                                      result=False)
    grace_period: int = setting(30, "Seconds without heartbeat after which another worker takes a unit over.",
                                result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grace_period <= self.heartbeat_interval or self.heartbeat_interval <= 0:
            raise ConfigError(f"grace_period={self.grace_period} must exceed heartbeat_interval="
                              f"{self.heartbeat_interval} > 0")
