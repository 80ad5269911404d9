"""Otter for a base no architecture module covers: an `OtterLayout` derived from the base's own module names.

Most decoder-only causal LMs in transformers are written as Llama is: `layers[i].self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj` (or a sparse block with fused experts), `input_layernorm` and `post_attention_layernorm`
(or Gemma's and OLMo's norms on the modules' outputs), `embed_tokens`, a final `norm` and a `rotary_emb`.
`derive_layout` reads those names from a built backbone (on any device, the meta device included) and says which
of the norm rules of `inserted_layer.py` each norm computes, by running a copy of it; where a capture point is
missing or a module is of no known kind it raises `LayoutNotDerived` naming it. Whether the derived layout is
right is then shown on a probe forward (`otter_hf.lifecycle.layout_probe`) before `otter_hf.insert` uses it.

`derived_architecture(model_type)` makes the Otter classes for a base `model_type`, named after the base's
(`OtterCohereConfig`, `OtterCohereModel`, `OtterCohereForCausalLMWithValueHead`,
`OtterCohereForSequenceClassification`), and registers them with the Auto classes. Their backbone derives its
layout from its own modules when it is built, so a saved checkpoint needs nothing but its config to be rebuilt:
its `auto_map` names the classes in this module, which makes them again on attribute access (`__getattr__`), with
otter_hf installed or as remote code.

This file imports only torch, transformers and its siblings, so it ships with a checkpoint as remote code.
"""

import copy
import functools
import sys

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING,
    MODEL_MAPPING_NAMES,
)

from .configuration_otter import OtterConfigMixin, attention_head_size
from .inserted_layer import (
    HalfRotation,
    InsertedGemmaRMSNorm,
    InsertedLayerNorm,
    InsertedOlmoRMSNorm,
    InsertedRMSNorm,
    NormCapture,
)
from .inserted_stream import OtterLayout, SparseMlp, first_expert_copy_source, linear_copy_source
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin

# Tried in this order; the first whose output is closest to the base norm's own is the norm's rule (Llama's and
# OLMo's differ only in where half precision rounds, so float32 probing takes Llama's).
NORM_RULES = (InsertedRMSNorm, InsertedOlmoRMSNorm, InsertedGemmaRMSNorm, InsertedLayerNorm)
# The largest relative difference from the base norm's output a norm rule may show on the float32 probe.
NORM_RULE_TOLERANCE = 1e-5
# The config fields transformers' families hold their norms' eps in.
NORM_EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "norm_eps", "layer_norm_epsilon", "norm_epsilon")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LayoutNotDerived(ValueError):
    """The base's modules do not follow the naming a derived layout reads: `path` is the capture point missing or
    not understood."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"`{path}`: {reason}")


def _submodule(parent: nn.Module, path: str, parent_path: str = "", kind: type = nn.Module) -> nn.Module:
    full_path = f"{parent_path}.{path}" if parent_path else path
    try:
        module = parent.get_submodule(path)
    except AttributeError:
        raise LayoutNotDerived(full_path, "the base has no module there") from None
    if not isinstance(module, kind):
        raise LayoutNotDerived(full_path, f"a {type(module).__name__}, not a {kind.__name__}")
    return module


def _has(parent: nn.Module, path: str) -> bool:
    try:
        parent.get_submodule(path)
    except AttributeError:
        return False
    return True


def norm_epsilon(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", None)
    return getattr(norm, "eps", None) if eps is None else eps


def norm_rule(norm: nn.Module, path: str) -> type:
    """The rule of `inserted_layer.py` that computes what `norm` computes, found by running a copy of it."""
    eps = norm_epsilon(norm)
    if getattr(norm, "weight", None) is None or not isinstance(eps, float):
        raise LayoutNotDerived(path, f"{type(norm).__name__} holds no weight and eps, as the norm rules read them")
    # Run on the CPU whatever the device (or device context) the backbone is built on.
    probe = copy.deepcopy(norm)
    probe = probe.to_empty(device="cpu") if probe.weight.is_meta else probe.to("cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe.float()
        for parameter in probe.parameters():
            parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator, device="cpu"))
        states = torch.randn(3, probe.weight.shape[-1], generator=generator, device="cpu") * 2 + 0.5
        expected = probe(states)
        if not isinstance(expected, torch.Tensor) or expected.shape != states.shape:
            raise LayoutNotDerived(path, f"{type(norm).__name__} does not return the normalised states")
        errors = {}
        for rule in NORM_RULES:
            if rule.has_bias != (getattr(probe, "bias", None) is not None):
                continue
            capture = NormCapture(
                statistics=rule.statistics(states, torch.tensor(eps, device="cpu")),
                normed=expected,
                weight=probe.weight,
                bias=getattr(probe, "bias", None),
            )
            errors[rule] = ((rule.normalize(capture, states) - expected).abs().max() / expected.abs().max()).item()
    best = min(errors, key=errors.get, default=None)
    if best is None or not errors[best] <= NORM_RULE_TOLERANCE:
        raise LayoutNotDerived(
            path,
            f"{type(norm).__name__} computes none of the norm rules ({', '.join(r.__name__ for r in NORM_RULES)})",
        )
    return best


def norm_eps_field(config, eps: float, path: str) -> str:
    """The config field holding the eps of the norm at `path`."""
    fields = [*NORM_EPS_FIELDS, *(name for name in config.to_dict() if "eps" in name)]
    field = next((name for name in fields if getattr(config, name, None) == eps), None)
    if field is None:
        raise LayoutNotDerived(path, f"no config field holds its eps ({eps})")
    return field


def _layer_norms(layer: nn.Module) -> dict:
    """The layout's norm fields for a decoder layer, from the norms' names: Llama's pre-norms, Gemma's sandwich
    norms, or OLMo's norms on the modules' outputs only."""
    if _has(layer, "pre_feedforward_layernorm"):
        return dict(
            attention_norm="input_layernorm",
            attention_output_norm="post_attention_layernorm",
            mlp_norm="pre_feedforward_layernorm",
            mlp_output_norm="post_feedforward_layernorm" if _has(layer, "post_feedforward_layernorm") else None,
        )
    if not _has(layer, "input_layernorm") and _has(layer, "post_feedforward_layernorm"):
        return dict(
            attention_norm=None,
            attention_output_norm="post_attention_layernorm",
            mlp_norm=None,
            mlp_output_norm="post_feedforward_layernorm",
        )
    return dict(attention_norm="input_layernorm", mlp_norm="post_attention_layernorm")


def _query_key_norms(attention: nn.Module, config, path: str) -> dict:
    if not (_has(attention, "q_norm") and _has(attention, "k_norm")):
        unknown = [name for name, _ in attention.named_children() if "norm" in name]
        if unknown:
            raise LayoutNotDerived(f"{path}.{unknown[0]}", "a norm in the attention of no kind the layout knows")
        return {}
    head_dim = attention_head_size(config)
    width = getattr(attention.q_norm, "weight", None)
    if width is not None and tuple(width.shape) == (head_dim,):
        return dict(query_key_norms=("q_norm", "k_norm"))
    if width is not None and tuple(width.shape) == (config.num_attention_heads * head_dim,):
        return dict(query_key_projection_norms=("q_norm", "k_norm"))
    raise LayoutNotDerived(f"{path}.q_norm", "neither a norm per head nor one over the whole query projection")


def _expert_copy_source(layer: nn.Module, role: str):
    """Copy-initialisation's sources in a sparse layer: gate and up are the first units of the shared expert where
    the block has one, else of expert 0; the attention's are Llama's."""
    if role not in ("gate", "up") or not _has(layer.mlp, "experts"):  # a dense layer beside the sparse ones
        return linear_copy_source(layer, role)
    shared = next(
        (getattr(layer.mlp, name) for name in ("shared_expert", "shared_experts") if _has(layer.mlp, name)), None
    )
    if shared is not None:
        projection = shared.get_submodule(f"{role}_proj")
        return projection.weight, projection.bias
    return first_expert_copy_source(layer.mlp.experts, role)


def _mlp_fields(layers: nn.ModuleList, layers_path: str) -> dict:
    """Dense MLPs (`gate_proj`, `up_proj`, `down_proj`, `act_fn`) and sparse blocks with fused experts."""
    sparse_classes, gated = set(), set()
    for index, layer in enumerate(layers):
        path = f"{layers_path}.{index}.mlp"
        mlp = _submodule(layer, "mlp", f"{layers_path}.{index}")
        if _has(mlp, "experts") and not _has(mlp, "down_proj"):
            experts = mlp.experts
            if getattr(experts, "gate_up_proj", None) is None or experts.gate_up_proj.dim() != 3:
                raise LayoutNotDerived(f"{path}.experts.gate_up_proj", "no fused gate/up projection of the experts")
            _submodule(experts, "act_fn", f"{path}.experts")
            sparse_classes.add(type(mlp))
            continue
        _submodule(mlp, "down_proj", path, nn.Linear)
        _submodule(mlp, "up_proj", path, nn.Linear)
        _submodule(mlp, "act_fn", path)
        gated.add(_has(mlp, "gate_proj"))
    if len(sparse_classes) > 1 or len(gated) > 1:
        raise LayoutNotDerived(f"{layers_path}.0.mlp", "the layers' MLPs are of several kinds")
    fields = dict(gated_mlp=gated.pop() if gated else True)
    if sparse_classes:
        fields.update(sparse_mlp=SparseMlp(sparse_classes.pop()), copy_source=_expert_copy_source)
    return fields


def _rotates(attention: nn.Module) -> bool:
    """Whether a base attention module applies the rotary embeddings it receives (SmolLM3-style `use_rope`)."""
    return bool(getattr(attention, "use_rope", True))


def _sliding_window(attention: nn.Module) -> int | None:
    """The window of a base attention module: its own, else its config's where it reads that (Mistral)."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(getattr(attention, "config", None), "sliding_window", None)


def derive_layout(backbone: nn.Module, config) -> OtterLayout:
    """The `OtterLayout` of a Llama-like backbone, read from its module names; `LayoutNotDerived` names the first
    capture point that is missing or of an unknown kind."""
    layers = _submodule(backbone, "layers", kind=nn.ModuleList)
    if len(layers) == 0:
        raise LayoutNotDerived("layers", "no decoder layers")
    _submodule(backbone, "embed_tokens", kind=nn.Embedding)
    norms = dict(norm=_submodule(backbone, "norm"))
    norm_fields = _layer_norms(layers[0])
    attention_fields = {}
    for index, layer in enumerate(layers):
        layer_path = f"layers.{index}"
        for path in norm_fields.values():
            if path is not None:
                norms[f"{layer_path}.{path}"] = _submodule(layer, path, layer_path)
        if not norm_fields["attention_norm"] and _has(layer, "input_layernorm"):
            raise LayoutNotDerived(f"{layer_path}.input_layernorm", "a norm of no kind the layout knows")
        attention = _submodule(layer, "self_attn", layer_path)
        for name in ATTENTION_PROJECTIONS:
            _submodule(attention, name, f"{layer_path}.self_attn", nn.Linear)
        if not isinstance(getattr(attention, "scaling", None), float):
            raise LayoutNotDerived(f"{layer_path}.self_attn.scaling", "the attention holds no float `scaling`")
        if getattr(attention, "head_dim", attention_head_size(config)) != attention_head_size(config):
            raise LayoutNotDerived(f"{layer_path}.self_attn.head_dim", "differs from the config's head size")
        attention_fields = _query_key_norms(attention, config, f"{layer_path}.self_attn")
    rules = {path: norm_rule(module, path) for path, module in norms.items()}
    if len(set(rules.values())) > 1:
        path = next(path for path, rule in rules.items() if rule is not rules["norm"])
        raise LayoutNotDerived(
            path, f"normalises as {rules[path].__name__}, the final norm as {rules['norm'].__name__}"
        )
    attention_module = layers[0].self_attn
    eager_attention = getattr(sys.modules[type(attention_module).__module__], "eager_attention_forward", None)
    if eager_attention is None:
        raise LayoutNotDerived("layers.0.self_attn", "its modeling file defines no `eager_attention_forward`")
    return OtterLayout(
        eager_attention_fn=eager_attention,
        rotary=HalfRotation if _has(backbone, "rotary_emb") else None,
        rotates=_rotates,
        norm=rules["norm"],
        norm_eps=norm_eps_field(config, norm_epsilon(norms["norm"]), "norm"),
        sliding_window=_sliding_window,
        embedding_multiplier="embedding_multiplier" if hasattr(config, "embedding_multiplier") else None,
        residual_multiplier="residual_multiplier" if hasattr(config, "residual_multiplier") else None,
        **norm_fields,
        **attention_fields,
        **_mlp_fields(layers, "layers"),
    )


def describe_layout(layout: OtterLayout) -> str:
    """What a derived layout reads, in a few words: its norm rule and placement, rotation, q/k norms and MLP."""
    placement = "pre-norms"
    if layout.attention_output_norm is not None:
        placement = "sandwich norms" if layout.attention_norm is not None else "norms on the modules' outputs"
    parts = [f"{layout.norm.__name__} {placement}", "rotary" if layout.rotary is not None else "no rotary"]
    if layout.query_key_norms or layout.query_key_projection_norms:
        parts.append("q/k norms per head" if layout.query_key_norms else "q/k norms over the projections")
    if layout.sparse_mlp is not None:
        parts.append(f"sparse {layout.sparse_mlp.block_class.__name__}")
    else:
        parts.append("gated MLP" if layout.gated_mlp else "MLP without a gate")
    return ", ".join(parts)


def _derive_own_layout(self) -> None:
    # The backbone's modules are built (on the meta device while loading): read the layout off them, then attach
    # the inserted parameters as every backbone does.
    self.otter_layout = derive_layout(self, self.config)
    OtterModelMixin.post_init(self)


def _keep_base_settings(self, config) -> None:
    OtterForCausalLMMixin.__init__(self, config)
    # The settings the base causal LM's __init__ keeps beside its modules (Cohere's `logit_scale`, a mixture of
    # experts' auxiliary-loss settings), which its forward reads: taken from the base class built on no memory.
    with torch.device("meta"):
        base = self.derived_from(config)
    for name, value in vars(base).items():
        if not name.startswith("_") and name not in vars(self) and isinstance(value, (bool, int, float, str)):
            setattr(self, name, value)


def _process_logits(self, logits: torch.Tensor) -> torch.Tensor:
    """What the base causal LMs of transformers do to the LM head's output, by their config fields (Cohere's
    `logit_scale`, Granite's `logits_scaling`, Gemma's `final_logit_softcapping`); the probe forward checks that
    this reproduces the base's logits."""
    config = self.config
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits


def derived_class_names(model_type: str) -> tuple[str, str, str, str] | None:
    """The names of the derived config, backbone, causal LM and sequence-classification view for `model_type`."""
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    backbone = MODEL_MAPPING_NAMES.get(model_type)
    config = CONFIG_MAPPING_NAMES.get(model_type)
    if not all(isinstance(name, str) for name in (causal_lm, backbone, config)):
        return None
    stem = causal_lm.removesuffix("ForCausalLM").removesuffix("LMHeadModel")
    return (
        f"Otter{config}",
        f"Otter{backbone}",
        f"Otter{causal_lm}WithValueHead",
        f"Otter{stem}ForSequenceClassification",
    )


@functools.cache
def derived_architecture(model_type: str) -> tuple[type, type, type, type]:
    """The Otter config, backbone, causal LM and sequence-classification view for base `model_type`, with the
    layout derived from the modules its backbone builds; registered with the Auto classes."""
    names = derived_class_names(model_type)
    if names is None:
        raise ValueError(f"transformers has no causal LM for model_type {model_type!r}.")
    config_name, backbone_name, causal_lm_name, view_name = names
    base_config = CONFIG_MAPPING[model_type]
    base_causal_lm, base_backbone = MODEL_FOR_CAUSAL_LM_MAPPING[base_config], MODEL_MAPPING[base_config]
    module = {"__module__": __name__}
    config_class = strict(
        type(
            config_name,
            (OtterConfigMixin, base_config),
            {**module, "model_type": f"otter_{model_type}", "base_model_type": model_type},
        )
    )
    keep_base_checkpoint_format(config_class)
    backbone = type(
        backbone_name,
        (OtterModelMixin, base_backbone),
        {**module, "config_class": config_class, "post_init": _derive_own_layout},
    )
    causal_lm = type(
        causal_lm_name,
        (OtterForCausalLMMixin, base_causal_lm),
        {
            **module,
            "config_class": config_class,
            "backbone_class": backbone,
            "derived_from": base_causal_lm,
            "__init__": _keep_base_settings,
            "process_logits": _process_logits,
        },
    )
    view = type(view_name, (OtterForSequenceClassificationMixin, causal_lm), dict(module))
    register_with_auto_classes(causal_lm, view)
    return config_class, backbone, causal_lm, view


def derived_architecture_of(otter_model_type: str) -> tuple[type, type, type, type] | None:
    """`derived_architecture` for the Otter `model_type` a derived checkpoint records (`otter_<base model_type>`);
    None where it names no base causal LM of this transformers."""
    base_model_type = otter_model_type.removeprefix("otter_")
    if base_model_type == otter_model_type or derived_class_names(base_model_type) is None:
        return None
    return derived_architecture(base_model_type)


def register_with_auto_classes(causal_lm: type, view: type) -> None:
    """Register an Otter architecture's config and classes with the Auto classes, and have its saved checkpoints
    carry their code and an `auto_map` for trust_remote_code without otter_hf."""
    config_class = causal_lm.config_class
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, causal_lm.backbone_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, causal_lm, exist_ok=True)
    AutoModelForSequenceClassification.register(config_class, view, exist_ok=True)
    config_class.register_for_auto_class()
    causal_lm.auto_map_classes = {
        "AutoModel": causal_lm.backbone_class,
        "AutoModelForCausalLM": causal_lm,
        "AutoModelForSequenceClassification": view,
    }
    for auto_class, model_class in causal_lm.auto_map_classes.items():
        model_class.register_for_auto_class(auto_class)


def __getattr__(name: str):
    # A saved checkpoint's `auto_map` names derived classes in this module: made again here on first access.
    if name.startswith("Otter"):
        for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            names = derived_class_names(model_type)
            if names is not None and name in names:
                return derived_architecture(model_type)[names.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
