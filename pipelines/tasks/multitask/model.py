"""One shared encoder, one linear classification head per label column; a normal transformers model folder.

The loss is ``sum_h weight_h * CE_h``, each head's cross-entropy averaged over the rows labelled for it (label id
-100: no label for that head); a batch without a labelled row for a head adds 0 for it. The logits of all heads
come out side by side, in ``label_columns`` order (split them with ``MultitaskConfig.head_sizes``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutput

IGNORE = -100  # the label id of a row without a label for a head


class MultitaskConfig(PreTrainedConfig):
    """The encoder's config, and per head its column, its labels (sorted) and its loss weight."""

    model_type = "pipelines-multitask"
    sub_configs_defaults: ClassVar[dict] = {"encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder: PreTrainedConfig | dict | None = None
    label_columns: list | None = None
    head_labels: list | None = None  # per head, its labels: label id -> name
    head_weights: list | None = None
    label_smoothing: float = 0.0  # of every head's training loss

    def head_sizes(self) -> list[int]:
        return [len(labels) for labels in self.head_labels]


class MultitaskModel(PreTrainedModel):
    config_class = MultitaskConfig
    base_model_prefix = "encoder"

    def __init__(self, config: MultitaskConfig, encoder: PreTrainedModel | None = None):
        """``encoder``: a loaded (pretrained) encoder of ``config.encoder``, kept as it is; else a new one."""
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder) if encoder is None else encoder
        config.encoder = self.encoder.config  # one config, with the attention implementation the encoder chose
        body = config.encoder
        dropout = getattr(body, "classifier_dropout", None)  # an explicit 0.0 is kept, as BERT's classifier does
        self.dropout = nn.Dropout(getattr(body, "hidden_dropout_prob", 0.1) if dropout is None else dropout)
        self.heads = nn.ModuleList(nn.Linear(body.hidden_size, size) for size in config.head_sizes())
        self.post_init()

    def _init_weights(self, module):
        std = getattr(self.config.encoder, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        outputs = self.encoder(**inputs)
        pooled = getattr(outputs, "pooler_output", None)  # a BERT-like pooler, as its sequence classifier uses
        pooled = self.dropout(outputs.last_hidden_state[:, 0] if pooled is None else pooled)
        logits = [head(pooled) for head in self.heads]
        loss = None if labels is None else self.loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=torch.cat(logits, dim=-1))

    def loss(self, logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """sum_h w_h * (the mean cross-entropy of head h over the rows labelled for it; 0 without such rows)."""
        total = logits[0].new_zeros((), dtype=torch.float32)
        for h, (head_logits, weight) in enumerate(zip(logits, self.config.head_weights)):
            target = labels[:, h]
            summed = nn.functional.cross_entropy(head_logits.float(), target, ignore_index=IGNORE, reduction="sum",
                                                 label_smoothing=self.config.label_smoothing)
            total = total + weight * summed / (target != IGNORE).sum().clamp(min=1)
        return total


AutoConfig.register(MultitaskConfig.model_type, MultitaskConfig, exist_ok=True)
AutoModel.register(MultitaskConfig, MultitaskModel, exist_ok=True)
