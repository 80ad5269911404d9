"""The sequence-classification view of an Otter model.

`OtterXForSequenceClassification` is the Otter causal LM with value head, same modules and same parameter
names, whose forward returns the value at each sequence's last real token as `logits` of shape
`(batch_size, 1)`. That is the interface of a transformers reward model (`num_labels == 1`), so TRL's stock
`RewardTrainer`, its reward-modelling script, and the reward functions of `GRPOTrainer`/`RLOOTrainer` use an
Otter checkpoint unchanged once `AutoModelForSequenceClassification` resolves it. A checkpoint saved
from the view loads back as the causal LM, and the reverse.

Each architecture's file defines its view, `OtterXForSequenceClassification(OtterForSequenceClassificationMixin,
OtterXForCausalLMWithValueHead)`, as transformers keeps `LlamaForSequenceClassification` in `modeling_llama.py`;
`otter_hf.modeling.sequence_classification_view` finds the view of a loaded causal LM.
"""

import copy

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.utils import can_return_tuple

from .configuration_otter import ONE_LABEL_ONLY
from .inserted_stream import CACHE_ARGUMENT_NAMES
from .modeling_otter import OtterForCausalLMMixin


def last_token_indices(
    attention_mask: torch.Tensor | None = None,
    input_ids: torch.LongTensor | None = None,
    pad_token_id: int | None = None,
) -> torch.LongTensor:
    """Position of each row's last real token, for left or right padding.

    The attention mask decides when given (it stays right when the pad token is also the EOS token that
    ends a sequence); without one, the last token that is not `pad_token_id`; without either, the last position.
    """
    if attention_mask is not None:
        real_tokens = attention_mask.bool()
    elif pad_token_id is not None:
        real_tokens = input_ids != pad_token_id
    else:
        real_tokens = torch.ones_like(input_ids, dtype=torch.bool)
    positions = torch.arange(real_tokens.shape[-1], device=real_tokens.device)
    return (positions * real_tokens).argmax(-1)


def pool_last_token(
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    input_ids: torch.LongTensor | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """The value at each row's last real token: `(batch_size, sequence_length)` -> `(batch_size,)`."""
    if attention_mask is None and input_ids is None:
        return value[:, -1]
    indices = last_token_indices(attention_mask, input_ids, pad_token_id).to(value.device)
    return value[torch.arange(value.shape[0], device=value.device), indices]


class OtterForSequenceClassificationMixin:
    """Turns an Otter causal LM with value head into its sequence-classification view."""

    def __init__(self, config):
        # An Otter config holds one label (`OtterConfigMixin`): other labels were asked for after it was built
        # (`from_pretrained(..., num_labels=2)` sets them on the loaded config), and the single value head cannot
        # give them.
        if config.num_labels != 1:
            raise ValueError(ONE_LABEL_ONLY.format(num_labels=config.num_labels))
        super().__init__(config)

    @classmethod
    def can_generate(cls) -> bool:
        return False

    @classmethod
    def from_causal_lm(cls, model: OtterForCausalLMMixin):
        """The view of an existing Otter causal LM, sharing its modules (and so its parameters) without copying."""
        with torch.device("meta"):
            view = cls(copy.deepcopy(model.config))
        for name, module in model.named_children():  # the backbone, the LM head and the inserted heads
            setattr(view, name, module)
        view.generation_config = copy.deepcopy(model.generation_config)
        view.name_or_path = model.name_or_path
        view.train(model.training)
        return view

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            # Scoring needs no cache, and of the LM head only the last position, which nothing reads. Kept by index,
            # not as `logits_to_keep=1`: with an integer Gemma 4 runs its KV-sharing layers on the kept positions
            # only, and the value is pooled at each row's last real token.
            use_cache=bool(use_cache),
            logits_to_keep=torch.tensor([-1], device=(input_ids if input_ids is not None else inputs_embeds).device),
            **{**kwargs, "return_dict": True},
        )
        if outputs.value is None:
            raise ValueError(
                "The sequence-classification view scores with the inserted stream; "
                "it cannot run inside `otter_disabled()`."
            )
        pooled = pool_last_token(outputs.value, attention_mask, input_ids, self.config.pad_token_id).unsqueeze(-1)

        loss = None
        if labels is not None:  # one label per sequence: regression, as transformers does for num_labels == 1
            loss = nn.functional.mse_loss(pooled.squeeze(-1), labels.to(pooled.dtype).reshape(-1))
        # The causal LM's cache under this transformers' name for it, which the classifier output shares.
        cache = {name: outputs[name] for name in CACHE_ARGUMENT_NAMES if name in outputs}
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, hidden_states=outputs.hidden_states, attentions=outputs.attentions, **cache
        )


__all__ = [
    "OtterForSequenceClassificationMixin",
    "last_token_indices",
    "pool_last_token",
]
