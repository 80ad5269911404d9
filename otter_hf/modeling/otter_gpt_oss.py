"""Otter for gpt-oss checkpoints: `GptOssForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared in the layout below:

- attention sinks: every base head has a learned sink logit (`self_attn.sinks`), a softmax column of its own. The
  inserted heads get sinks of their own (`inserted_attn.sinks`), which copy-initialisation copies from each
  inserted head's source head; the base's are untouched;
- sliding and full layers alternate (`layer_types`): each attention module carries its own window, which the
  inserted heads of its layer take, and their cache layers are of the same kind;
- the rotary tables cover half a head, rotating its first half against its second (`HalfTablesRotation`);
- q/k/v/o biases, and RMSNorm applying its weight in float32 before the cast back;
- every MLP is a mixture of experts (`GptOssMLP`: a router with a bias, then fused 3-D experts with biases, stored
  as `[E, H, 2I]` with the gate and up values interleaved, and a SwiGLU whose inputs are clamped to `limit` and
  whose sigmoid is scaled by `alpha`). The inserted units read the block's normalised input and take the experts'
  own activation (`GptOssExperts._apply_gate`, handed its gate and up values interleaved); the inserted down
  projection reads the block's output (`SparseMlp`). Copy-initialisation copies expert 0's first units with
  their biases (gpt-oss has no shared expert).

transformers runs gpt-oss's attention with eager or with kernels that take the sinks (flash, flex on an
accelerator); it refuses sdpa, which has no sinks, and so does the Otter model built on it.
"""

import transformers
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import (
    GptOssForCausalLM,
    GptOssMLP,
    GptOssModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import HalfTablesRotation, InsertedOlmoRMSNorm, InterleavedGatedUnits
from .inserted_stream import OtterLayout, SparseMlp, linear_copy_source
from .modeling_otter import OtterModelMixin, OtterMoeForCausalLMMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterGptOssConfig(OtterConfigMixin, GptOssConfig):
    model_type = "otter_gpt_oss"
    base_model_type = "gpt_oss"


# Saved as gpt-oss checkpoints are.
keep_base_checkpoint_format(OtterGptOssConfig)


def gpt_oss_copy_source(layer: nn.Module, role: str):
    """Llama's attention projections; gate and up are expert 0's first units with their biases, read from the
    fused `gate_up_proj [E, H, 2I]` (input-major, gate and up values interleaved). Down is not read (the inserted
    down projection starts as the identity on the block output)."""
    if role in ("gate", "up"):
        experts = layer.mlp.experts
        offset = {"gate": 0, "up": 1}[role]
        return experts.gate_up_proj[0, :, offset::2].T, experts.gate_up_proj_bias[0, offset::2]
    return linear_copy_source(layer, role)


def experts_activation(experts: nn.Module) -> InterleavedGatedUnits:
    """The experts' own clamped SwiGLU, which reads gate and up values interleaved."""
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is None:
        raise ValueError(
            f"Otter's gpt_oss layout takes the inserted units' activation from `mlp.experts._apply_gate`, which the "
            f"gpt_oss experts of transformers {transformers.__version__} do not have; install a transformers version "
            "otter_hf supports (see its README)."
        )
    return InterleavedGatedUnits(apply_gate)


class OtterGptOssModel(OtterModelMixin, GptOssModel):
    config_class = OtterGptOssConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        rotary=HalfTablesRotation,
        norm=InsertedOlmoRMSNorm,
        attention_sinks="sinks",
        sparse_mlp=SparseMlp(GptOssMLP, activation="mlp.experts", gated_units=experts_activation),
        copy_source=gpt_oss_copy_source,
    )


class OtterGptOssForCausalLMWithValueHead(OtterMoeForCausalLMMixin, GptOssForCausalLM):
    config_class = OtterGptOssConfig
    backbone_class = OtterGptOssModel


class OtterGptOssForSequenceClassification(OtterForSequenceClassificationMixin, OtterGptOssForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterGptOssConfig",
    "OtterGptOssModel",
    "OtterGptOssForCausalLMWithValueHead",
    "OtterGptOssForSequenceClassification",
]
