"""The Otter pieces shared by every architecture served with vLLM.

An Otter model carries two residual streams: the original stream `h`, computed here by the base architecture's
own vLLM modules on the very same tensors as in the base model (so the original logits are the base model's), and
the inserted stream `g`, which reads `h` and is never read by it. Each decoder layer runs the base layer's
computation step for step, collects what the inserted stream reads into a `LayerCapture` and hands it to the
inserted layer otter_hf runs in transformers (`inserted_layer.py`, the same file). What is vLLM's own:

- each projection over both streams is held as its two column blocks (`JoinedInputLinear`), so the joined input is
  never copied;
- the inserted heads keep their own paged KV cache (their own vLLM `Attention`), with the base heads' scale and
  window (`VllmHeadsAttention`);
- embeddings: `g_0` is the inserted embedding columns of the token; the final norm normalises both streams.

The model's forward returns the final `[h_n, g_n]` joined, so what vLLM hands `compute_logits` and the pooler (the
rows it keeps) carries both streams: the LM head reads `h_n`, the value head and the token reward head read `g_n`.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.pooler import DispatchPooler
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix

from .configuration import InsertionSizes
from .inserted_layer import (
    HalfRotation,
    InsertedRMSNorm,
    LayerCapture,
    NormCapture,
    OtterInsertedAttention,
    OtterInsertedMLP,
    check_joined_weight,
    inserted_layer,
)
from .token_reward_guidance import TOKEN_REWARD_HANDOFF

# Checkpoint names of the inserted parameters that vLLM's base modules cannot hold -> this package's modules.
# The inserted attention and MLP projections load under their checkpoint names.
INSERTED_WEIGHTS_MAPPER = WeightsMapper(
    orig_to_new_suffix={
        "model.embed_tokens.inserted_weight": "model.inserted_embed_tokens.weight",
        ".input_layernorm.inserted_weight": ".inserted_input_layernorm.weight",
        ".post_attention_layernorm.inserted_weight": ".inserted_post_attention_layernorm.weight",
        "model.norm.inserted_weight": "model.inserted_norm.weight",
    },
    # Draft heads serve otter_hf's speculative decoding in transformers (vLLM drafts with its own methods), expert
    # heads its `expert_weight` steering: vLLM serves the original logits, the value and token-level guidance.
    orig_to_new_prefix={
        "draft_heads.": None,
        "recurrent_draft_head.": None,
        "expert_head.": None,
        "anti_expert_head.": None,
    },
)


def check_supported(vllm_config: VllmConfig) -> None:
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ValueError(
            "Otter models run in vLLM on one device: the inserted heads read every original head, which tensor "
            "parallelism splits across devices. Use tensor_parallel_size=1 and pipeline_parallel_size=1 (data "
            "parallelism replicates the model and works)."
        )


class OtterInsertedRMSNorm(nn.Module):
    """The inserted stream's weight for one base RMSNorm; the statistics are otter_hf's (`InsertedRMSNorm`)."""

    def __init__(self, inserted_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(inserted_size))
        # A tensor, so that `eps + |h|² / n` is one operation.
        self.register_buffer("eps", torch.tensor(eps, dtype=torch.float32), persistent=False)

    def capture(self, original: torch.Tensor, normed: torch.Tensor | None) -> NormCapture:
        """The base norm seen from the inserted stream, for its input `original` and its output `normed`."""
        return NormCapture(InsertedRMSNorm.statistics(original, self.eps), normed, self.weight)

    def forward(self, inserted: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return InsertedRMSNorm.normalize(self.capture(original, None), inserted)


class JoinedInputLinear(nn.Module):
    """A linear layer over the original and the inserted stream joined, `W [x, y] + b`, computed as
    `(W_x x + b) + W_y y` from the weight's two column blocks, so the joined input is never built: at prefill that
    copy costs about as much as the product itself. `W_x x + b` is a vLLM linear layer; the narrow `W_y y` is added
    in place by one `addmm_`, so a decode step pays no second linear layer's dispatch. It loads the checkpoint's one
    weight."""

    def __init__(self, original_size: int, inserted_size: int, output_size: int, bias: bool, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.original_size = original_size
        self.original = ReplicatedLinear(original_size, output_size, bias=bias, prefix=f"{prefix}.original")
        self.inserted_weight = nn.Parameter(torch.empty(output_size, inserted_size), requires_grad=False)

    def forward(self, original: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
        output, _ = self.original(original)
        return output.addmm_(inserted, self.inserted_weight.t())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set()
        for name, tensor in weights:
            if name == "weight":
                expected = (self.inserted_weight.shape[0], self.original_size + self.inserted_weight.shape[1])
                check_joined_weight(f"{self.prefix}.weight", tensor.shape, expected)
                self.original.weight_loader(self.original.weight, tensor[:, : self.original_size])
                self.inserted_weight.data.copy_(tensor[:, self.original_size :])
                loaded |= {"original.weight", "inserted_weight"}
            elif name == "bias" and self.original.bias is not None:
                self.original.weight_loader(self.original.bias, tensor)
                loaded.add("original.bias")
            else:
                raise ValueError(f"Unexpected inserted weight `{name}` for a linear layer over both streams.")
        return loaded


class VllmHeadsAttention:
    """How one layer's inserted heads attend in vLLM (`InsertedHeadsAttention`): through their own `Attention`
    (paged KV cache, the base heads' scale and window), with the base attention's q/k norms and rotary tables."""

    rotary = HalfRotation
    # The families the plugin serves normalise no value heads.
    value_norm = None

    def __init__(self, attention: Attention, rotary_tables, query_key_norms):
        self.attention = attention
        self.rotary_tables = rotary_tables
        self.query_key_norms = query_key_norms

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # vLLM's attention takes (tokens, heads * head_dim).
        return self.attention(query.flatten(-2), key.flatten(-2), value.flatten(-2))


def rotary_tables(rotary_emb: nn.Module, positions: torch.Tensor, dtype: torch.dtype):
    """`HalfRotation`'s tables for `positions`, from a vLLM rotary embedding's cos/sin cache (neox style: the
    rotated halves are the channel halves, as in transformers' `rotate_half`)."""
    if not rotary_emb.is_neox_style:
        raise ValueError("Otter's inserted heads rotate as transformers' `rotate_half` (neox style) does.")
    cos, sin = rotary_emb.cos_sin_cache[positions].to(dtype).chunk(2, dim=-1)
    return HalfRotation.tables(torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1))


def _normalize_heads(norm: nn.Module, states: torch.Tensor, head_dim: int) -> torch.Tensor:
    by_head = states.view(*states.shape[:-1], states.shape[-1] // head_dim, head_dim)
    return norm(by_head).view(states.shape)


class OtterDecoderLayerMixin:
    """Turns a vLLM decoder layer (Llama's layout: `input_layernorm`, `self_attn`, `post_attention_layernorm`,
    `mlp`) into an Otter layer. The architecture's layer calls `add_inserted_modules` at the end of its `__init__`
    and overrides `query_key_norms` where its attention normalises query and key heads."""

    def add_inserted_modules(self, config, cache_config: CacheConfig | None, prefix: str) -> None:
        sizes = InsertionSizes.from_config(config)
        attention = self.self_attn
        self.inserted_input_layernorm = OtterInsertedRMSNorm(sizes.hidden_size, config.rms_norm_eps)
        self.inserted_post_attention_layernorm = OtterInsertedRMSNorm(sizes.hidden_size, config.rms_norm_eps)
        # The inserted modules take biases where their base counterparts have them, as in otter_hf.
        self.inserted_attn = OtterInsertedAttention(
            config.hidden_size,
            sizes.hidden_size,
            num_original_heads=attention.total_num_heads,
            num_heads=sizes.num_attention_heads,
            num_key_value_heads=sizes.num_key_value_heads,
            head_dim=attention.head_dim,
            qkv_bias=attention.qkv_proj.bias is not None,
            output_bias=attention.o_proj.bias is not None,
            norm=InsertedRMSNorm,
            linear=JoinedInputLinear,
            prefix=f"{prefix}.inserted_attn",
        )
        self.inserted_attn.attn = Attention(
            sizes.num_attention_heads,
            attention.head_dim,
            attention.scaling,
            num_kv_heads=sizes.num_key_value_heads,
            cache_config=cache_config,
            per_layer_sliding_window=attention.attn.sliding_window,
            prefix=f"{prefix}.inserted_attn.attn",
        )
        self.inserted_mlp = OtterInsertedMLP(
            config.hidden_size,
            sizes.hidden_size,
            original_units=config.intermediate_size,
            inserted_units=sizes.intermediate_size,
            bias=self.mlp.gate_up_proj.bias is not None,
            act_fn=nn.SiLU(),
            norm=InsertedRMSNorm,
            linear=JoinedInputLinear,
            prefix=f"{prefix}.inserted_mlp",
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        inserted: torch.Tensor,
        rotary_tables: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The base layer's forward step for step: vLLM defers each residual add into the next norm, whose `residual`
        # output is then the original stream h itself, which the inserted norms read for rms(h). The statistics are
        # taken at once: the next fused norm overwrites `residual` in place.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        attention_norm = self.inserted_input_layernorm.capture(residual, hidden_states)
        original_heads, attention_output = self.original_attention(positions, hidden_states)

        hidden_states, residual = self.post_attention_layernorm(attention_output, residual)
        mlp_norm = self.inserted_post_attention_layernorm.capture(residual, hidden_states)
        original_units, mlp_output = self.original_mlp(hidden_states)

        capture = LayerCapture(
            attention_norm=attention_norm,
            attention=VllmHeadsAttention(self.inserted_attn.attn, rotary_tables, self.query_key_norms()),
            original_heads=original_heads,
            mlp_norm=mlp_norm,
            original_units=original_units,
        )
        return mlp_output, residual, inserted_layer(self.inserted_attn, self.inserted_mlp, inserted, capture)

    # -- what the base modules compute, with the tensors the inserted stream reads ------------------------------

    def query_key_norms(self) -> tuple[nn.Module, nn.Module] | None:
        """The norms the architecture applies to each query and key head before the rotary embedding (Qwen3)."""
        return None

    def original_attention(self, positions, normed) -> tuple[torch.Tensor, torch.Tensor]:
        """The base attention's forward, also returning the heads' outputs (the input of its `o_proj`)."""
        attention = self.self_attn
        qkv, _ = attention.qkv_proj(normed)
        query, key, value = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        norms = self.query_key_norms()
        if norms is not None:
            query, key = (
                _normalize_heads(norm, states, attention.head_dim) for norm, states in zip(norms, (query, key))
            )
        query, key = attention.rotary_emb(positions, query, key)
        heads = attention.attn(query, key, value)
        output, _ = attention.o_proj(heads)
        return heads, output

    def original_mlp(self, normed) -> tuple[torch.Tensor, torch.Tensor]:
        """The base gated MLP's forward, also returning its units (the input of its `down_proj`)."""
        mlp = self.mlp
        gate_up, _ = mlp.gate_up_proj(normed)
        units = mlp.act_fn(gate_up)
        output, _ = mlp.down_proj(units)
        return units, output


class OtterModelMixin:
    """Adds the inserted embedding columns and final norm to a vLLM decoder stack and runs both streams."""

    def add_inserted_modules(self, config) -> None:
        sizes = InsertionSizes.from_config(config)
        self.inserted_embed_tokens = VocabParallelEmbedding(config.vocab_size, sizes.hidden_size)
        self.inserted_norm = OtterInsertedRMSNorm(sizes.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("Otter models embed both streams from token ids; prompt embeddings are not supported.")
        hidden_states = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        inserted = self.inserted_embed_tokens(input_ids)
        layers = self.layers[self.start_layer : self.end_layer]
        # The inserted heads' rotation tables, once for every layer: they all rotate with the same embedding.
        tables = rotary_tables(layers[0].self_attn.rotary_emb, positions, hidden_states.dtype)
        residual = None
        for layer in layers:
            hidden_states, residual, inserted = layer(positions, hidden_states, residual, inserted, tables)
        hidden_states, residual = self.norm(hidden_states, residual)
        return torch.cat([hidden_states, self.inserted_norm(inserted, residual)], dim=-1)


class OtterValueHead(nn.Module):
    """`v_head.summary`: one float32 value per token from the final inserted stream."""

    def __init__(self, inserted_size: int):
        super().__init__()
        self.summary = nn.Linear(inserted_size, 1, dtype=torch.float32)

    def forward(self, inserted_hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(inserted_hidden.to(torch.float32))


class OtterTokenRewardHead(nn.Module):
    """`token_reward_head.proj`: reward logits = the original logits + `W_r g` (GenARM's reward policy)."""

    def __init__(self, inserted_size: int, vocab_size: int):
        super().__init__()
        self.proj = ReplicatedLinear(inserted_size, vocab_size, bias=False, prefix="token_reward_head.proj")

    def forward(self, logits: torch.Tensor, inserted_hidden: torch.Tensor) -> torch.Tensor:
        reward, _ = self.proj(inserted_hidden.to(self.proj.weight.dtype))
        return reward.to(logits.dtype).add_(logits)


class OtterForCausalLM(nn.Module):
    """An Otter causal LM served by vLLM: the original logits, the token reward logits for guided requests, and,
    under `runner="pooling"`, the value (`classify`: the last token's, `token_classify`: every token's).

    Each architecture's class names its decoder stack in `model_class`.
    """

    model_class: type[nn.Module]
    hf_to_vllm_mapper = INSERTED_WEIGHTS_MAPPER

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        check_supported(vllm_config)
        config = vllm_config.model_config.hf_config
        sizes = InsertionSizes.from_config(config)
        self.config = config
        self.hidden_size = config.hidden_size
        self.model = self.model_class(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        self.v_head = OtterValueHead(sizes.hidden_size)
        self.token_reward_head = (
            OtterTokenRewardHead(sizes.hidden_size, config.vocab_size) if sizes.token_reward_head else None
        )
        if vllm_config.model_config.runner_type == "pooling":
            # vLLM's pooling adapter keeps a pooler the model defines.
            self.pooler = DispatchPooler.for_seq_cls(vllm_config.model_config.pooler_config, classifier=self.value)

    def split_streams(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Contiguous, so the LM head runs the matmul it runs in the base model.
        return hidden_states[..., : self.hidden_size].contiguous(), hidden_states[..., self.hidden_size :]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        hidden, inserted_hidden = self.split_streams(hidden_states)
        logits = self.logits_processor(self.lm_head, hidden)
        guided_rows = TOKEN_REWARD_HANDOFF.guided_rows
        if guided_rows is not None and self.token_reward_head is not None:
            TOKEN_REWARD_HANDOFF.put(self.token_reward_head(logits[guided_rows], inserted_hidden[guided_rows]))
        return logits

    def value(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The value head's output, shape (tokens, 1), for the pooler."""
        return self.v_head(self.split_streams(hidden_states)[1])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
