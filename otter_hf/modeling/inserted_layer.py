"""One inserted decoder layer, in plain torch: the maths both engines run, transformers and vLLM.

A base decoder layer computes the original stream `h`; the engine collects what the inserted stream reads from it
into a `LayerCapture` (the norms' statistics of `h` and their outputs `h_n`, the original heads and units, how
the inserted heads attend) and the inserted modules turn it into the inserted stream's update. Per decoder layer,
with `g` the inserted stream (see `otter-design.md`):

    g_n = w' * g / rms(h)                       (the original stream's statistics, the inserted weight)
    q', k', v' = A [h_n, g_n];  g += O [heads, heads']    (a layer with softmax attention)
    g += R mix                                   (a linear-attention layer: its output `mix`, no inserted heads)
    u' = act(G [h_n, g_n]) * (U [h_n, g_n]);  g += D [units, u']
    g += P' per_layer_units                     (Gemma 4's per-layer inputs, where the base has them)
    g *= s                                      (where the base scales its whole stream at a layer's end)

Where transformers and vLLM differ (their attention kernels and caches, their linear layers, how weights load),
the engine hands in an object: `InsertedHeadsAttention` for attending, a linear layer over both streams for each
projection. Everything else is written here once.

This file imports only torch, so it ships with a checkpoint as remote code and loads in vLLM's environment.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

# -- what a base layer hands the inserted layer ---------------------------------------------------------------


@dataclass
class NormCapture:
    """One base norm, seen from the inserted stream: the statistics of the original stream at its input, its
    output (the normalised original stream `h_n`), and the inserted stream's own weight (and bias) for it."""

    statistics: Any
    normed: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class RawInput:
    """A module the base feeds the raw original stream, no norm before it (OLMo 2/3 normalise only the modules'
    outputs): the inserted stream enters the inserted projections raw too."""

    # The original stream `h` as the module reads it (the field a `NormCapture` holds `h_n` in).
    normed: torch.Tensor


class InsertedHeadsAttention(Protocol):
    """How the inserted heads of one layer attend, as the base heads of that layer do. Queries, keys and values
    come token-major: `(..., tokens, heads, head_dim)`."""

    # The rotation's tables for these positions (its rule's `tables`: `HalfRotation`'s unless the inserted attention
    # was built with another rule), None where the layer rotates nothing.
    rotary_tables: Any
    # The query and key norms of the inserted heads, each applied to `(..., tokens, heads, head_dim)`: the base
    # attention's per-head norms (Qwen3, Gemma 3) or `ProjectionNorm`s (OLMo 2/3), None where it has none. In a
    # layer whose heads read the keys and values of another layer (`projects_key_value=False`), the key norm is
    # not applied.
    query_key_norms: tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None
    # The norm the base attention applies to every value head (Gemma 4), None where it has none.
    value_norm: Callable[[torch.Tensor], torch.Tensor] | None

    def attend(self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor:
        """The heads' outputs, `(..., tokens, heads * head_dim)`, with the layer's scale, window, mask and cache.
        Key and value are None where the heads attend over the keys and values of an earlier layer's inserted
        heads, as the base heads of a KV-sharing layer (Gemma 4) attend over an earlier layer's."""


@dataclass
class LayerCapture:
    """What the inserted layer reads from one base decoder layer's forward."""

    # None in a linear-attention layer (Gated DeltaNet), which has no inserted heads (see `linear_output`).
    attention_norm: NormCapture | RawInput | None
    attention: InsertedHeadsAttention | None
    # The input of the attention output projection: the original heads' outputs.
    original_heads: torch.Tensor | None
    mlp_norm: NormCapture | RawInput
    # The input of the MLP down projection: the original units.
    original_units: torch.Tensor
    # What the inserted heads read beside `h_n` where the base attention compresses its input first (DeepSeek's
    # latent attention: the normalised query and key/value latents), joined after `h_n`.
    attention_latents: tuple[torch.Tensor, ...] = ()
    # Norms on a module's output (Gemma's sandwich norms): only the statistics are read.
    attention_output_norm: NormCapture | None = None
    mlp_output_norm: NormCapture | None = None
    # What the base multiplies each module's output by before adding it to its stream (Granite), None for 1.
    residual_multiplier: float | None = None
    # A linear-attention layer's output, what it adds to the original stream (None in a softmax-attention layer).
    linear_output: torch.Tensor | None = None
    # Gemma 4's per-layer inputs: the units the base's per-layer block projects onto its stream (the input of its
    # `per_layer_projection`), and the norm on that projection's output; None where the base has no such block.
    per_layer_units: torch.Tensor | None = None
    per_layer_output_norm: NormCapture | None = None
    # What the base multiplies its whole stream by at the end of the layer (Gemma 4's `layer_scalar`), None for 1.
    output_scale: torch.Tensor | None = None


# -- norms ------------------------------------------------------------------------------------------------------


class InsertedRMSNorm:
    """Llama's RMSNorm, `w * x / rms(x)` cast back to the input dtype before the weight, on the inserted stream:
    `rms` is the original stream's, the weight the inserted one."""

    neutral_weight = 1.0
    has_bias = False

    @staticmethod
    def statistics(original: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # `rsqrt(mean(x²) + eps)` in three operations: one float32 reduction, then `eps + norm² / n` at once. At a
        # decode step these are tiny tensors, where each operation's dispatch is what costs.
        norm = torch.linalg.vector_norm(original, dim=-1, keepdim=True, dtype=torch.float32)
        return torch.addcmul(eps, norm, norm, value=1.0 / original.shape[-1]).rsqrt_()

    @staticmethod
    def normalize(norm: NormCapture, inserted: torch.Tensor) -> torch.Tensor:
        if inserted.dtype == torch.float32:  # the casts below are identities; skip their dispatch
            return norm.weight * (inserted * norm.statistics)
        return norm.weight * (inserted.to(torch.float32) * norm.statistics).to(inserted.dtype)


def inserted_input(norm: type, captured: NormCapture | RawInput, inserted: torch.Tensor) -> torch.Tensor:
    """The inserted stream as a module's inserted projections read it: normalised by `norm` with the original
    stream's statistics, or raw where the base feeds the module raw `h`."""
    return inserted if isinstance(captured, RawInput) else norm.normalize(captured, inserted)


@dataclass
class ProjectionNorm:
    """A norm over a whole query or key projection (OLMo 2/3), applied to the inserted heads: the statistics of the
    original projection, the inserted weight over the inserted heads' width. A copy-initialised inserted head is
    then normalised exactly as its source head; statistics of the inserted heads alone would scale it otherwise."""

    norm: type
    captured: NormCapture

    def __call__(self, heads: torch.Tensor) -> torch.Tensor:
        """`heads` (..., tokens, heads, head_dim), normalised."""
        return self.norm.normalize(self.captured, heads.flatten(-2)).view(heads.shape)


class InsertedGemmaRMSNorm(InsertedRMSNorm):
    """Gemma's RMSNorm, `x / rms(x) * (1 + w)` in float32; a zero weight leaves the stream unscaled."""

    neutral_weight = 0.0

    @staticmethod
    def normalize(norm, inserted):
        return (inserted.float() * norm.statistics * (1.0 + norm.weight.float())).type_as(inserted)


class InsertedOlmoRMSNorm(InsertedRMSNorm):
    """OLMo's RMSNorm, `w * x / rms(x)` with the weight applied in float32 before the cast back."""

    @staticmethod
    def normalize(norm, inserted):
        return (norm.weight * (inserted.float() * norm.statistics)).to(inserted.dtype)


class InsertedLayerNorm:
    """LayerNorm with bias (GPT-2): the inserted stream is centred and scaled by the original stream's mean and
    variance, then takes its own weight and bias."""

    neutral_weight = 1.0
    has_bias = True

    @staticmethod
    def statistics(original, eps):
        variance, mean = torch.var_mean(original, dim=-1, keepdim=True, correction=0)
        return mean, torch.rsqrt(variance + eps)

    @staticmethod
    def normalize(norm, inserted):
        mean, inverse_std = norm.statistics
        return (inserted - mean) * inverse_std * norm.weight + norm.bias


# -- rotation ---------------------------------------------------------------------------------------------------


class HalfRotation:
    """Rotary embeddings as Llama applies them, `x * cos + rotate_half(x) * sin`, on the first `cos.shape[-1]`
    channels of each head (all of them, or Phi-3's partial rotary), with the tables the base attention uses.

    The inserted heads rotate their queries and keys as one tensor, and `rotate_half(x) * sin` is taken as
    `roll(x) * signed_sin`, the same products: four operations per layer where the base function spends fourteen.
    """

    @staticmethod
    def tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, signed_sin)` from tables of shape `(..., tokens, rotary_dim)`, broadcast over the heads of
        token-major states; computed once per forward for every layer that shares the embeddings."""
        half = sin.shape[-1] // 2
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos.unsqueeze(-2), signed_sin.unsqueeze(-2)

    @staticmethod
    def rotate(states: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`states` (..., tokens, heads, head_dim), rotated."""
        cos, signed_sin = tables
        rotary_dim = cos.shape[-1]
        if rotary_dim == states.shape[-1]:
            rotated = states * cos + states.roll(rotary_dim // 2, dims=-1) * signed_sin
            # Float32 tables (OLMo 2/3) on half-precision states: cast back, as the base's rotation does.
            return rotated if rotated.dtype == states.dtype else rotated.to(states.dtype)
        rotated, passed = states[..., :rotary_dim], states[..., rotary_dim:]
        rotated = rotated * cos + rotated.roll(rotary_dim // 2, dims=-1) * signed_sin
        return torch.cat([rotated.to(states.dtype), passed], dim=-1)


class HalfTablesRotation(HalfRotation):
    """Rotary embeddings whose tables cover half a head (gpt-oss: `cos`, `sin` of width `head_dim / 2`, the first
    half of each head rotated against the second): the same rotation as `HalfRotation` with the tables repeated
    over both halves."""

    @staticmethod
    def tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return HalfRotation.tables(torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1))


@dataclass(frozen=True)
class InterleavedGatedUnits:
    """A family's gated activation that reads the gate and up values interleaved in one tensor, `[g0, u0, g1, u1,
    ...]`, and returns the units (gpt-oss's experts, `_apply_gate`: a SwiGLU with clamped inputs, its `alpha` and
    `limit` from the config). The inserted MLP computes its gate and up values as two blocks and hands them over
    interleaved, so its units take the family's own activation."""

    activation: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.activation(torch.stack((gate, up), dim=-1).flatten(-2))


class TrailingRotation:
    """Rotary embeddings on the last `cos.shape[-1]` channels of each head, the rest passed (DeepSeek-V3's latent
    attention: a head is `[nope, rope]`). `interleaved`: the rotated channels are pairs `(x0, x1), (x2, x3), ...`
    each turned by one angle, and leave de-interleaved (DeepSeek-V3's `rope_interleave`); otherwise Llama's
    halves."""

    def __init__(self, interleaved: bool):
        self.interleaved = interleaved

    def tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.interleaved:
            return HalfRotation.tables(cos, sin)
        # The tables are `cat(angles, angles)`: the first half holds each pair's angle.
        half = cos.shape[-1] // 2
        return cos[..., :half].unsqueeze(-2), sin[..., :half].unsqueeze(-2)

    def rotate(self, states: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = tables
        rotary_dim = 2 * cos.shape[-1] if self.interleaved else cos.shape[-1]
        passed, rotated = states.split([states.shape[-1] - rotary_dim, rotary_dim], dim=-1)
        if self.interleaved:
            even, odd = rotated[..., 0::2], rotated[..., 1::2]
            rotated = torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
        else:
            rotated = HalfRotation.rotate(rotated, tables)
        return torch.cat([passed, rotated.to(states.dtype)], dim=-1)


class ComplexRotation:
    """Rotary embeddings as complex factors (`freqs_cis`, Llama 4 and DeepSeek-V2): the last `2 * F` channels of
    each head, as `F` pairs, are multiplied by the tables in float32 and cast back; the channels before them pass."""

    @staticmethod
    def tables(freqs_cis: torch.Tensor) -> torch.Tensor:
        """`(..., tokens, F)` complex factors, broadcast over the heads of token-major states."""
        return freqs_cis.unsqueeze(-2)

    @staticmethod
    def rotate(states: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        rotary_dim = 2 * tables.shape[-1]
        passed, rotated = states.split([states.shape[-1] - rotary_dim, rotary_dim], dim=-1)
        pairs = torch.view_as_complex(rotated.float().contiguous().view(*rotated.shape[:-1], -1, 2))
        rotated = torch.view_as_real(pairs * tables).flatten(-2).type_as(states)
        return rotated if rotary_dim == states.shape[-1] else torch.cat([passed, rotated], dim=-1)


# -- projections over both streams ----------------------------------------------------------------------------


class JoinedLinear(nn.Linear):
    """A linear layer over the original and the inserted stream joined, `W [x, y] + b`, holding `W` as one
    weight (its checkpoint layout). vLLM holds the same weight as two column blocks (`otter_hf_vllm`)."""

    def forward(self, original: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat([original, inserted], dim=-1))


def check_joined_weight(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Refuse a stored weight of an inserted projection whose shape does not fit the config."""
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"The inserted weight `{name}` has shape {tuple(shape)} in this checkpoint, where its config gives "
            f"{tuple(expected)}: the weights and config.json do not belong together; save the model again with "
            "`save_pretrained`."
        )


LinearFactory = Callable[[int, int, int, bool, str], nn.Module]


def joined_linear(original_size: int, inserted_size: int, output_size: int, bias: bool, name: str) -> nn.Module:
    """transformers' projection over both streams (`name` is the module's path, which vLLM's layers need)."""
    return JoinedLinear(original_size + inserted_size, output_size, bias=bias)


# -- the inserted modules ---------------------------------------------------------------------------------------


class OtterInsertedAttention(nn.Module):
    """The inserted attention heads of one layer, and their update of the inserted stream.

    Queries, keys and values read both streams (`[h_n, g_n]`, with the base attention's latents after `h_n` where
    it has them); the output, added to the inserted stream only, reads the original heads' outputs and the inserted
    heads' outputs. The heads attend as the base heads do: their q/k norms, rotation, scale, window, mask,
    attention kernel and cache (the capture's `attention`). Values may be narrower than queries and keys
    (`value_head_dim`, DeepSeek's latent attention). With `output_gate` (Qwen3.5, Qwen3-Next: the base multiplies
    each head's output by `sigmoid` of a gate its query projection computes), the inserted heads compute their own
    gates too, after the values in `qkv_proj`. In a layer whose base heads reuse an earlier layer's keys and values
    (Gemma 4's KV sharing, `projects_key_value=False`), the inserted heads project queries only and attend over the
    earlier layer's inserted keys and values.
    """

    def __init__(
        self,
        hidden_size: int,
        inserted_hidden_size: int,
        num_original_heads: int,
        num_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        qkv_bias: bool,
        output_bias: bool,
        norm: type,
        linear: LinearFactory = joined_linear,
        prefix: str = "",
        output_gate: bool = False,
        value_head_dim: int | None = None,
        latent_size: int = 0,
        rotary=HalfRotation,
        norms_after_rotation: bool = False,
        projects_key_value: bool = True,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.value_head_dim = value_head_dim or head_dim
        self.output_gate = output_gate
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = num_heads // num_key_value_heads
        self.norm = norm
        # The rotation rule for the tables the capture hands in, and whether the q/k norms follow it (Llama 4).
        self.rotary = rotary
        self.norms_after_rotation = norms_after_rotation
        self.projects_key_value = projects_key_value
        projected_key_value_heads = num_key_value_heads if projects_key_value else 0
        # Queries and keys, values, then the output gates (as wide as the heads' outputs).
        self.qkv_sizes = [
            (num_heads + projected_key_value_heads) * head_dim,
            projected_key_value_heads * self.value_head_dim,
            num_heads * self.value_head_dim if output_gate else 0,
        ]
        self.qkv_proj = linear(
            hidden_size + latent_size, inserted_hidden_size, sum(self.qkv_sizes), qkv_bias, f"{prefix}.qkv_proj"
        )
        self.o_proj = linear(
            num_original_heads * self.value_head_dim,
            num_heads * self.value_head_dim,
            inserted_hidden_size,
            output_bias,
            f"{prefix}.o_proj",
        )

    def forward(self, inserted: torch.Tensor, capture: LayerCapture) -> torch.Tensor:
        """The attention's update of the inserted stream."""
        attention = capture.attention
        inserted_normed = inserted_input(self.norm, capture.attention_norm, inserted)
        original = capture.attention_norm.normed
        if capture.attention_latents:
            original = torch.cat([original, *capture.attention_latents], dim=-1)
        query_key, value, gate = self.qkv_proj(original, inserted_normed).split(self.qkv_sizes, dim=-1)
        query_key = query_key.view(*query_key.shape[:-1], -1, self.head_dim)
        value = value.view(*value.shape[:-1], -1, self.value_head_dim)
        heads = self._attend(query_key, value, attention)
        if self.output_gate:
            heads = heads * torch.sigmoid(gate)
        output = self.o_proj(capture.original_heads, heads)
        if capture.attention_output_norm is not None:
            output = self.norm.normalize(capture.attention_output_norm, output)
        return output

    def _attend(self, query_key: torch.Tensor, value: torch.Tensor, attention: InsertedHeadsAttention) -> torch.Tensor:
        """The inserted heads' outputs from their projected queries (and keys and values where they have their own),
        normalised and rotated as the base's are."""
        if not self.norms_after_rotation:
            query_key = self._normalize_queries_and_keys(query_key, attention)
        if attention.rotary_tables is not None:
            query_key = self.rotary.rotate(query_key, attention.rotary_tables)
        if self.norms_after_rotation:
            query_key = self._normalize_queries_and_keys(query_key, attention)
        if not self.projects_key_value:
            return attention.attend(query_key, None, None)
        query, key = query_key.split([self.num_heads, self.num_key_value_heads], dim=-2)
        if attention.value_norm is not None:
            value = attention.value_norm(value)
        return attention.attend(query, key, value)

    def _normalize_queries_and_keys(self, query_key: torch.Tensor, attention: InsertedHeadsAttention) -> torch.Tensor:
        """Queries and keys (queries alone in a layer that reuses another's keys) through the base's q/k norms."""
        if attention.query_key_norms is None:
            return query_key
        query_norm, key_norm = attention.query_key_norms
        if not self.projects_key_value:
            return query_norm(query_key)
        query, key = query_key.split([self.num_heads, self.num_key_value_heads], dim=-2)
        return torch.cat([query_norm(query), key_norm(key)], dim=-2)


class OtterLinearAttentionReadout(nn.Module):
    """The inserted stream's update in a linear-attention layer, which has no inserted heads: a projection of what
    the base's linear attention adds to the original stream, `g += R mix` (read as a sparse block's output is: its
    recurrent internals stay the base's). Copy-initialised as the identity on the first dimensions, it keeps the
    inserted stream following the dimensions it copies."""

    def __init__(self, hidden_size: int, inserted_hidden_size: int):
        super().__init__()
        self.o_proj = nn.Linear(hidden_size, inserted_hidden_size, bias=False)

    def forward(self, inserted: torch.Tensor, capture: LayerCapture) -> torch.Tensor:
        return self.o_proj(capture.linear_output)


class OtterInsertedMLP(nn.Module):
    """The inserted units of one layer, and their update of the inserted stream: gate and up (or up alone, for an
    MLP without a gate) read both streams, down reads the original units and the inserted ones."""

    def __init__(
        self,
        hidden_size: int,
        inserted_hidden_size: int,
        original_units: int,
        inserted_units: int,
        bias: bool,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        norm: type,
        gated: bool = True,
        linear: LinearFactory = joined_linear,
        prefix: str = "",
        gated_units: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.gated = gated
        self.norm = norm
        # How gate and up values make the units where the family's rule is not `act_fn(gate) * up` (gpt-oss's
        # clamped SwiGLU); `act_fn` is then unused.
        self.gated_units = gated_units
        # The names of the checkpoint layout: `gate_up_proj` for a gated MLP, `up_proj` otherwise.
        input_projection = "gate_up_proj" if gated else "up_proj"
        input_size = 2 * inserted_units if gated else inserted_units
        setattr(
            self,
            input_projection,
            linear(hidden_size, inserted_hidden_size, input_size, bias, f"{prefix}.{input_projection}"),
        )
        self.down_proj = linear(original_units, inserted_units, inserted_hidden_size, bias, f"{prefix}.down_proj")
        self.act_fn = act_fn

    def forward(self, inserted: torch.Tensor, capture: LayerCapture) -> torch.Tensor:
        """The MLP's update of the inserted stream."""
        inserted_normed = inserted_input(self.norm, capture.mlp_norm, inserted)
        normed = capture.mlp_norm.normed
        if self.gated:
            gate, up = self.gate_up_proj(normed, inserted_normed).chunk(2, dim=-1)
            units = self.act_fn(gate) * up if self.gated_units is None else self.gated_units(gate, up)
        else:
            units = self.act_fn(self.up_proj(normed, inserted_normed))
        output = self.down_proj(capture.original_units, units)
        if capture.mlp_output_norm is not None:
            output = self.norm.normalize(capture.mlp_output_norm, output)
        return output


class OtterInsertedPerLayerInput(nn.Module):
    """The inserted stream's share of a base layer's per-layer input block (Gemma 4): a projection of the base's
    gated per-layer units (`act(gate(h)) * per_layer_input`) onto the inserted stream, normalised as the base
    normalises its own projection. The inserted stream has no per-layer input embedding of its own: the per-layer
    inputs enter it through the original stream's units, as the original heads and units do."""

    def __init__(self, original_units: int, inserted_hidden_size: int, norm: type):
        super().__init__()
        self.norm = norm
        self.proj = nn.Linear(original_units, inserted_hidden_size, bias=False)

    def forward(self, capture: LayerCapture) -> torch.Tensor:
        """The per-layer input's update of the inserted stream."""
        return self.norm.normalize(capture.per_layer_output_norm, self.proj(capture.per_layer_units))


def inserted_layer(
    attention: OtterInsertedAttention | OtterLinearAttentionReadout,
    mlp: OtterInsertedMLP,
    inserted: torch.Tensor,
    capture: LayerCapture,
    per_layer_input: OtterInsertedPerLayerInput | None = None,
) -> torch.Tensor:
    """One decoder layer of the inserted stream: `g + attention(g)` (the inserted heads' update, or a
    linear-attention layer's readout), then `+ mlp(...)` (then `+ per_layer_input` where the base has per-layer
    inputs), from one layer's capture; each update scaled as the base scales its own, and the result as the base
    scales its stream at the layer's end."""
    multiplier = capture.residual_multiplier
    update = attention(inserted, capture)
    inserted = inserted + (update if multiplier is None else update * multiplier)
    update = mlp(inserted, capture)
    inserted = inserted + (update if multiplier is None else update * multiplier)
    if per_layer_input is not None:
        inserted = inserted + per_layer_input(capture)
    return inserted if capture.output_scale is None else inserted * capture.output_scale


__all__ = [
    "ComplexRotation",
    "HalfRotation",
    "HalfTablesRotation",
    "InsertedGemmaRMSNorm",
    "InsertedHeadsAttention",
    "InsertedLayerNorm",
    "InsertedOlmoRMSNorm",
    "InsertedRMSNorm",
    "InterleavedGatedUnits",
    "JoinedLinear",
    "LayerCapture",
    "NormCapture",
    "OtterInsertedAttention",
    "OtterInsertedMLP",
    "OtterInsertedPerLayerInput",
    "OtterLinearAttentionReadout",
    "ProjectionNorm",
    "RawInput",
    "TrailingRotation",
    "check_joined_weight",
    "inserted_input",
    "inserted_layer",
    "joined_linear",
]
