"""The Otter pieces shared by every architecture served with vLLM.

An Otter model carries two residual streams: the original stream `h`, computed here by the base architecture's
own vLLM modules on the very same tensors as in the base model (so the original logits are the base model's), and
the inserted stream `g`, which reads `h` at module boundaries and is never read by it. Per decoder layer
(otter_hf's `modeling_otter.py` holds the same maths for transformers):

- norms: `h_n = w * h / rms(h)` (the base norm), `g_n = w' * g / rms(h)`;
- attention: the inserted heads' queries, keys and values read `[h_n, g_n]` (each projection over both streams is
  held as its two column blocks, `JoinedInputLinear`), are treated as the original heads'
  (q/k norms, rotary embedding, scale, window) and keep their own paged KV cache (their own vLLM `Attention`);
  their output projection reads the original heads' outputs (the input of the base `o_proj`) and their own;
- MLP: the inserted units read `[h_n, g_n]`; their down projection reads the original units (the input of the
  base `down_proj`) and their own;
- embeddings: `g_0` is the inserted embedding columns of the token; the final norm normalises both streams.

The model's forward returns the final `[h_n, g_n]` joined, so what vLLM hands `compute_logits` and the pooler (the
rows it keeps) carries both streams: the LM head reads `h_n`, the value head and the token reward head read `g_n`.
"""

from collections.abc import Callable, Iterable

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.pooler import DispatchPooler
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix

from .configuration import InsertionSizes
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
    # Draft heads serve otter_hf's speculative decoding in transformers; vLLM drafts with its own methods.
    orig_to_new_prefix={"draft_heads.": None, "recurrent_draft_head.": None},
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
    """The inserted stream's side of an RMSNorm: `w' * g / rms(h)`, with `rms(h)` from the original stream.

    Computed as otter_hf computes it (`InsertedRMSNorm`): `rms(h)` from one float32 reduction, the stream scaled in
    float32 and cast back before the weight.
    """

    def __init__(self, inserted_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(inserted_size))
        # A tensor, so that `eps + |h|² / n` is one operation.
        self.register_buffer("eps", torch.tensor(eps, dtype=torch.float32), persistent=False)

    def forward(self, inserted: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(original, dim=-1, keepdim=True, dtype=torch.float32)
        inverse_rms = torch.addcmul(self.eps, norm, norm, value=1.0 / original.shape[-1]).rsqrt_()
        if inserted.dtype == torch.float32:
            return self.weight * (inserted * inverse_rms)
        return self.weight * (inserted.to(torch.float32) * inverse_rms).to(inserted.dtype)


class JoinedInputLinear(nn.Module):
    """A linear layer over the original and the inserted stream joined, `W [x, y] + b`, computed as
    `(W_x x + b) + W_y y` from the weight's two column blocks, so the joined input is never built: at prefill that
    copy costs about as much as the product itself. `W_x x + b` is a vLLM linear layer; the narrow `W_y y` is added
    in place by one `addmm_`, so a decode step pays no second linear layer's dispatch. It loads the checkpoint's one
    weight."""

    def __init__(self, original_size: int, inserted_size: int, output_size: int, bias: bool, prefix: str):
        super().__init__()
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
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"An inserted projection over both streams has a weight of shape {tuple(tensor.shape)} in "
                        f"this checkpoint, where its config gives {expected}: the weights and config.json do not "
                        "belong together; save the model again with `save_pretrained`."
                    )
                self.original.weight_loader(self.original.weight, tensor[:, : self.original_size])
                self.inserted_weight.data.copy_(tensor[:, self.original_size :])
                loaded |= {"original.weight", "inserted_weight"}
            elif name == "bias" and self.original.bias is not None:
                self.original.weight_loader(self.original.bias, tensor)
                loaded.add("original.bias")
            else:
                raise ValueError(f"Unexpected inserted weight `{name}` for a linear layer over both streams.")
        return loaded


class OtterInsertedAttention(nn.Module):
    """The inserted attention heads of one layer, with their own KV cache."""

    def __init__(
        self,
        hidden_size: int,
        num_original_heads: int,
        sizes: InsertionSizes,
        head_dim: int,
        scaling: float,
        qkv_bias: bool,
        output_bias: bool,
        sliding_window: int | None,
        cache_config: CacheConfig | None,
        prefix: str,
    ):
        super().__init__()
        self.q_size = sizes.num_attention_heads * head_dim
        self.kv_size = sizes.num_key_value_heads * head_dim
        self.qkv_proj = JoinedInputLinear(
            hidden_size, sizes.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = JoinedInputLinear(
            num_original_heads * head_dim, self.q_size, sizes.hidden_size, bias=output_bias, prefix=f"{prefix}.o_proj"
        )
        self.attn = Attention(
            sizes.num_attention_heads,
            head_dim,
            scaling,
            num_kv_heads=sizes.num_key_value_heads,
            cache_config=cache_config,
            per_layer_sliding_window=sliding_window,
            prefix=f"{prefix}.attn",
        )

    def forward(
        self,
        positions: torch.Tensor,
        normed: torch.Tensor,
        inserted_normed: torch.Tensor,
        original_heads: torch.Tensor,
        prepare_query_key: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        qkv = self.qkv_proj(normed, inserted_normed)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query, key = prepare_query_key(positions, query, key)
        heads = self.attn(query, key, value)
        return self.o_proj(original_heads, heads)


class OtterInsertedMLP(nn.Module):
    """The inserted gated units of one layer: gate and up read both streams, down reads all units."""

    def __init__(self, hidden_size: int, intermediate_size: int, sizes: InsertionSizes, bias: bool, prefix: str):
        super().__init__()
        self.gate_up_proj = JoinedInputLinear(
            hidden_size, sizes.hidden_size, 2 * sizes.intermediate_size, bias=bias, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = JoinedInputLinear(
            intermediate_size, sizes.intermediate_size, sizes.hidden_size, bias=bias, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = SiluAndMul()

    def forward(self, normed: torch.Tensor, inserted_normed: torch.Tensor, original_units: torch.Tensor):
        gate_up = self.gate_up_proj(normed, inserted_normed)
        return self.down_proj(original_units, self.act_fn(gate_up))


class OtterDecoderLayerMixin:
    """Turns a vLLM decoder layer (Llama's layout: `input_layernorm`, `self_attn`, `post_attention_layernorm`,
    `mlp`) into an Otter layer. The architecture's layer calls `add_inserted_modules` at the end of its `__init__`
    and overrides `normalize_query_key` where its attention normalises query and key heads."""

    def add_inserted_modules(self, config, cache_config: CacheConfig | None, prefix: str) -> None:
        sizes = InsertionSizes.from_config(config)
        attention = self.self_attn
        self.inserted_input_layernorm = OtterInsertedRMSNorm(sizes.hidden_size, config.rms_norm_eps)
        self.inserted_post_attention_layernorm = OtterInsertedRMSNorm(sizes.hidden_size, config.rms_norm_eps)
        # The inserted modules take biases where their base counterparts have them, as in otter_hf.
        self.inserted_attn = OtterInsertedAttention(
            config.hidden_size,
            attention.total_num_heads,
            sizes,
            attention.head_dim,
            attention.scaling,
            qkv_bias=attention.qkv_proj.bias is not None,
            output_bias=attention.o_proj.bias is not None,
            sliding_window=attention.attn.sliding_window,
            cache_config=cache_config,
            prefix=f"{prefix}.inserted_attn",
        )
        self.inserted_mlp = OtterInsertedMLP(
            config.hidden_size,
            config.intermediate_size,
            sizes,
            bias=self.mlp.gate_up_proj.bias is not None,
            prefix=f"{prefix}.inserted_mlp",
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        inserted: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The base layer's forward step for step: vLLM defers each residual add into the next norm, whose `residual`
        # output is then the original stream h itself, which the inserted norms read for rms(h).
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        inserted_normed = self.inserted_input_layernorm(inserted, residual)
        original_heads, attention_output = self.original_attention(positions, hidden_states)
        inserted = inserted + self.inserted_attn(
            positions, hidden_states, inserted_normed, original_heads, self.prepare_inserted_query_key
        )

        hidden_states, residual = self.post_attention_layernorm(attention_output, residual)
        inserted_normed = self.inserted_post_attention_layernorm(inserted, residual)
        original_units, mlp_output = self.original_mlp(hidden_states)
        inserted = inserted + self.inserted_mlp(hidden_states, inserted_normed, original_units)
        return mlp_output, residual, inserted

    # -- what the base modules compute, with the tensors the inserted stream reads ------------------------------

    def normalize_query_key(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the architecture does to query and key heads before the rotary embedding (Qwen3: q/k norms)."""
        return query, key

    def prepare_inserted_query_key(self, positions, query, key):
        """The inserted heads' queries and keys, treated as the original heads' are."""
        query, key = self.normalize_query_key(query, key)
        return self.self_attn.rotary_emb(positions, query, key)

    def original_attention(self, positions, normed) -> tuple[torch.Tensor, torch.Tensor]:
        """The base attention's forward, also returning the heads' outputs (the input of its `o_proj`)."""
        attention = self.self_attn
        qkv, _ = attention.qkv_proj(normed)
        query, key, value = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        query, key = self.normalize_query_key(query, key)
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
        residual = None
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden_states, residual, inserted = layer(positions, hidden_states, residual, inserted)
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
