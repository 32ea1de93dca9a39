"""Training techniques as Trainer hooks (no training loop of our own), each saved into and restored from the
checkpoints, so that a resumed run continues bit for bit:

- ``ema_decay``: an exponential moving average of the weights, updated after every optimizer step; evaluation,
  the best-checkpoint choice and the final model use it (``ema.pt`` in each checkpoint);
- ``swa_epochs``: stochastic weight averaging, the mean of the weights at the end of each of the last N epochs
  becomes the final model (``swa.pt``); transformers models have no BatchNorm, so nothing else needs updating;
- ``loss=focal`` / ``class_weights=balanced``: the loss, through ``Trainer.compute_loss_func``;
- ``layerwise_lr_decay``: per-layer learning rates, through an optimizer built before ``Trainer.train``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from pipelines.config import StageConfig
from pipelines.errors import ConfigError

logger = logging.getLogger(__name__)


class WeightAverage(TrainerCallback):
    """An average of the model's parameters, kept beside training and saved in every checkpoint as ``FILE``."""

    FILE = ""

    def __init__(self, checkpoint: Path | None):
        self.checkpoint = checkpoint  # the checkpoint training resumes from (its saved average is restored)
        self.average: dict[str, torch.Tensor] | None = None
        self.count = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.checkpoint is not None:
            saved = self.checkpoint / self.FILE
            if not saved.is_file():
                raise RuntimeError(f"checkpoint {self.checkpoint} has no {self.FILE}: it was not saved by a run "
                                   "with this averaging, so it cannot be resumed bit for bit. Start a new run "
                                   "(resume=false), or init_from=<that checkpoint> to keep its weights")
            self.load(saved, model)
        elif self.average is None:
            self.start(model)

    def start(self, model) -> None:
        """The average before training: none yet."""

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        torch.save({"average": self._under_every_name(model), "count": self.count}, folder / self.FILE)

    def _under_every_name(self, model) -> dict[str, torch.Tensor] | None:
        """The average under every state-dict name of each parameter: a tied weight is listed by
        ``named_parameters`` under one name only (XLM-R's word embedding as ``lm_head.decoder.weight``), which a
        model of another head (``init_ema``) would not find."""
        if self.average is None:
            return None
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        every = dict(self.average)
        for key, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in names and key not in every:
                every[key] = self.average[names[id(tensor)]]
        return every

    def load(self, path: Path, model) -> None:
        """The saved average, on the device of ``model``'s parameters (it may have been saved on another)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.average, self.count = saved["average"], saved["count"]
        if self.average is not None:
            devices = {name: parameter.device for name, parameter in model.named_parameters()}
            self.average = {name: self.average[name].to(device) for name, device in devices.items()}

    def copy_into(self, model) -> None:
        if self.average is None:
            return
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(self.average[name])

    @contextlib.contextmanager
    def applied(self, model):
        """The model holds the average inside the block, its own weights again after it."""
        if self.average is None:
            yield
            return
        own = _snapshot(model)
        self.copy_into(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    parameter.copy_(own[name])


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


class EMA(WeightAverage):
    """ema = decay * ema + (1 - decay) * weights after every optimizer step. At the end of training the model
    takes the EMA of the best checkpoint (``load_best_model_at_end``) or the current one."""

    FILE = "ema.pt"

    def __init__(self, decay: float, checkpoint: Path | None):
        super().__init__(checkpoint)
        self.decay = decay

    def start(self, model) -> None:
        self.average = _snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                self.average[name].lerp_(parameter.detach(), 1.0 - self.decay)
        self.count += 1

    def on_train_end(self, args, state, control, model=None, **kwargs):
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and (Path(best) / self.FILE).is_file():
            self.load(Path(best) / self.FILE, model)
        self.copy_into(model)
        logger.info("the model now holds the EMA of its weights (decay %g, %d steps)", self.decay, self.count)


class SWA(WeightAverage):
    """The mean of the weights at the end of each of the last ``epochs`` epochs of ``total``."""

    FILE = "swa.pt"

    def __init__(self, epochs: int, total: int, checkpoint: Path | None):
        super().__init__(checkpoint)
        self.epochs, self.total = epochs, total

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """At an epoch's last optimizer step (``state.epoch`` is then whole), which comes before that step's
        checkpoint is saved (``on_epoch_end`` comes after it: a checkpoint there would miss the epoch)."""
        if abs(state.epoch - round(state.epoch)) > 1e-6 or round(state.epoch) <= self.total - self.epochs:
            return
        self.count += 1
        if self.average is None:
            self.average = _snapshot(model)
            return
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                self.average[name].add_((parameter.detach() - self.average[name]) / self.count)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.average is not None:
            self.copy_into(model)
            logger.info("the model now holds the mean of its weights over the last %d epochs", self.count)


class ScheduleFrom(TrainerCallback):
    """``init_epoch=continue``: the fresh learning-rate schedule starts at the step the run starts from."""

    def __init__(self, step: int):
        self.step = step

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose
            for _ in range(self.step):
                lr_scheduler.step()


def averaging_callbacks(cfg: StageConfig, checkpoint: Path | None) -> list[WeightAverage]:
    """The weight-averaging callbacks the settings ask for (before the checkpoint upload in the callback list:
    their state must be in the checkpoint folder when it is uploaded)."""
    if cfg.ema_decay:
        return [EMA(cfg.ema_decay, checkpoint)]
    if cfg.swa_epochs:
        return [SWA(cfg.swa_epochs, cfg.epochs, checkpoint)]
    return []


def install(cfg: StageConfig, trainer: Trainer, averages: list[WeightAverage], loss: Callable | None = None) -> None:
    """Hook the loss (the task's, when it has one: ``Task.loss``), the optimizer and EMA evaluation into
    ``trainer`` as the settings ask."""
    if loss is not None:
        trainer.compute_loss_func = loss
    if cfg.layerwise_lr_decay < 1.0:
        trainer.optimizer = layerwise_optimizer(trainer, cfg.layerwise_lr_decay)
    for average in averages:
        if isinstance(average, EMA):
            evaluate = trainer.evaluate

            def evaluate_with_ema(*args, **kwargs):
                with average.applied(trainer.model):
                    return evaluate(*args, **kwargs)

            trainer.evaluate = evaluate_with_ema


def balanced_weights(label_ids: np.ndarray, classes: int) -> torch.Tensor:
    """rows / (classes x rows of the class); a class absent from the training rows weighs 0."""
    counts = np.bincount(label_ids, minlength=classes).astype(np.float64)
    weights = np.divide(len(label_ids), classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


class FocalLoss:
    """-(1 - p)^gamma * log p of the true class (Lin et al., 2017), times the class weight; gamma=0 without
    weights is the cross-entropy. Normalised by the examples of the whole accumulated batch when the Trainer
    says how many there are (gradient accumulation), else the mean over the batch.

    Computed in float32 whatever the logits' precision, with ``1 - p`` kept at least ``FLOOR``: once p rounds to
    1.0 the gradient of ``(1 - p)^gamma`` is ``gamma * 0^(gamma - 1) * 0`` = inf * 0 = NaN for 0 < gamma < 1 (the
    floor changes no value that float32 can tell from 0, so other losses stay bit for bit the same)."""

    FLOOR = 1e-12

    def __init__(self, gamma: float, weights: torch.Tensor | None):
        self.gamma, self.weights = gamma, weights

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        log_p = torch.log_softmax(logits.float(), dim=-1).gather(1, labels.view(-1, 1)).squeeze(1)
        loss = -((1.0 - log_p.exp()).clamp(min=self.FLOOR) ** self.gamma) * log_p if self.gamma else -log_p
        if self.weights is not None:
            loss = loss * self.weights.to(loss.device)[labels]
        if num_items_in_batch is not None:
            return loss.sum() / num_items_in_batch
        return loss.mean()


_LAYER = re.compile(r"(?:^|\.)(?:layers?|block)\.(\d+)\.")  # BERT-likes, DistilBERT, BART, T5 (the block)


def layer_depths(model) -> dict[str, int]:
    """Per parameter, how many layers below the top of its stack it is. The stacks are the model, or an
    encoder-decoder's encoder and decoder, each counted on its own: layer ``i`` of ``L`` at ``L - 1 - i``, the
    stack's embeddings at its bottom ``L`` (an embedding shared by both stacks, as in BART and T5, at the bottom
    of the deeper), the rest (heads, final norms, pooler) at 0. A tied weight is judged by every name it has (XLM-R
    lists its word embedding as ``lm_head.decoder.weight``). ConfigError when a stack has no numbered layers."""
    split = bool(getattr(model.config, "is_encoder_decoder", False))

    def stack(name: str) -> str | None:
        return next((part for part in name.split(".") if part in ("encoder", "decoder")), None) if split else "encoder"

    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    every = [name for names in aliases.values() for name in names]
    layers: dict[str, int] = {}
    for name, match in ((name, _LAYER.search(name)) for name in every):
        if match and stack(name):
            layers[stack(name)] = max(layers.get(stack(name), 0), int(match.group(1)) + 1)
    missing = sorted({stack(name) for name in every} - set(layers) - {None})
    if missing or not layers:
        raise ConfigError(f"layerwise_lr_decay: {type(model).__name__} has no numbered {' or '.join(missing)} "
                          "layers to give their own rates (e.g. ALBERT shares one layer); pass layerwise_lr_decay=1")
    depths = {}
    for name, parameter in model.named_parameters():
        names, match = aliases[id(parameter)], _LAYER.search(name)
        stacks = {stack(alias) for alias in names} & set(layers)
        if match and stack(name):
            depths[name] = layers[stack(name)] - 1 - int(match.group(1))
        elif any("embed" in alias or alias.endswith("shared.weight") for alias in names):
            depths[name] = max(layers[s] for s in stacks or layers)
        else:
            depths[name] = 0
    return depths


def layerwise_optimizer(trainer: Trainer, decay: float) -> torch.optim.Optimizer:
    """The Trainer's own optimizer class and settings, with one parameter group per (depth, weight decay): the
    learning rate of a group is ``learning_rate * decay ** depth``."""
    model = trainer.model
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    decayed = set(trainer.get_decay_parameter_names(model))
    depths = layer_depths(model)
    groups: dict[tuple[int, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault((depths[name], name in decayed), []).append(parameter)
    lr = trainer.args.learning_rate
    param_groups = [{"params": params, "lr": lr * decay ** depth,
                     "weight_decay": trainer.args.weight_decay if decayed_group else 0.0}
                    for (depth, decayed_group), params in sorted(groups.items())]
    logger.info("layer-wise learning rates: %s", ", ".join(f"depth {d}: {lr * decay ** d:.3g}"
                                                           for d in sorted({d for d, _ in groups})))
    return cls(param_groups, **{k: v for k, v in kwargs.items() if k != "lr"})
