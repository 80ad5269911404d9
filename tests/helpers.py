"""What the tests share: tiny base models of every supported architecture, Otter models inserted into them, token
batches, offline tokenizers, short trainer configs and a fake Hub. The fixtures built on them are in conftest.py.

Imported by package path (`from tests.helpers import ...`), also by the scripts the tests launch in subprocesses.
"""

import hashlib
import os
import shutil

import torch
from datasets import Dataset
from huggingface_hub import CommitInfo, RepoUrl
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace, WhitespaceSplit
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3_5ForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

import otter_hf
from otter_hf.cli import main
from otter_hf.trainers import OtterDraftConfig

# The repository root: child processes import these helpers from there.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAD, EOS = 0, 1
COMMON = dict(vocab_size=96, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)

# Tiny base models covering the features the insertion must respect.
BASE_MODELS = {
    # grouped-query attention, tied embeddings
    "llama-gqa-tied": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    # multi-head attention, untied embeddings, odd head size
    "llama-mha-untied": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    ),
    # q/k/v biases
    "qwen2-bias": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
    # sliding-window attention shorter than the test sequences, one key/value head
    "mistral-sliding": (
        MistralConfig,
        MistralForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=4,
            tie_word_embeddings=False,
        ),
    ),
    # q/k norms on every head, a head size other than hidden_size / num_attention_heads
    "qwen3-qk-norm": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            tie_word_embeddings=False,
        ),
    ),
    # scaled embeddings, (1 + w) norms before and after each module, q/k norms, a sliding layer (window shorter
    # than the test sequences) then a global one, GELU-tanh gated MLP, final-logit softcapping that bites
    "gemma3-sliding-softcap": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=0.5,
            tie_word_embeddings=True,
        ),
    ),
    # LayerNorm with bias, learned position embeddings, fused Conv1D query/key/value, GELU MLP without a gate
    "gpt2-layernorm": (
        GPT2Config,
        GPT2LMHeadModel,
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, n_inner=112),
    ),
    # fused query/key/value and gate/up projections, rotary embeddings on half of each head
    "phi3-fused-partial-rotary": (
        Phi3Config,
        Phi3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            partial_rotary_factor=0.5,
            tie_word_embeddings=False,
        ),
    ),
    # multipliers on the embeddings, the residual updates and the logits, and an attention scale other than
    # head_dim ** -0.5
    "granite-multipliers": (
        GraniteConfig,
        GraniteForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            embedding_multiplier=3.0,
            residual_multiplier=0.4,
            attention_multiplier=0.5,
            logits_scaling=2.5,
            tie_word_embeddings=True,
        ),
    ),
    # a layer with rotary embeddings, then one without
    "smollm3-no-rope-layer": (
        SmolLM3Config,
        SmolLM3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            no_rope_layers=[1, 0],
            tie_word_embeddings=True,
        ),
    ),
    # norms on the modules' outputs only, q/k norms over the whole projections, a sliding layer (window shorter
    # than the test sequences) then a full one
    "olmo3-post-norm-sliding": (
        Olmo3Config,
        Olmo3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=False,
        ),
    ),
    # OLMo 3's layout without sliding layers, multi-head attention
    "olmo2-post-norm": (
        Olmo2Config,
        Olmo2ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        ),
    ),
    # mixture of experts (4 experts, top-2, fused 3-D expert parameters) in layer 1, a dense MLP in layer 0
    # (`mlp_only_layers`), q/k norms
    "qwen3moe-sparse-dense": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
        ),
    ),
    # a mixture of experts in every layer (4 experts, top-2, fused 3-D expert parameters), one key/value head
    "mixtral-sparse": (
        MixtralConfig,
        MixtralForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        ),
    ),
    # a mixture of experts with a shared expert (gated by a sigmoid) in layer 0, a dense MLP in layer 1
    # (`mlp_only_layers`), q/k/v biases, one key/value head
    "qwen2moe-shared-expert": (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        ),
    ),
    # attention sinks, a sliding layer (window shorter than the test sequences) then a full one, rotary tables over
    # half a head, q/k/v/o biases, a mixture of experts in every layer (4 experts, top-2, a router with a bias,
    # experts with biases and a clamped SwiGLU, gate and up interleaved)
    "gptoss-sinks-sliding": (
        GptOssConfig,
        GptOssForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            # gpt-oss's YaRN rotary embeddings, stretched over the tiny context
            rope_parameters=dict(
                rope_type="yarn", rope_theta=150000.0, factor=4.0, original_max_position_embeddings=32
            ),
            # small enough for the clamp to bite on the tiny model's gate and up values
            swiglu_limit=0.05,
            tie_word_embeddings=False,
        ),
    ),
    # a dense MLP in layer 0 (`first_k_dense_replace`), then a mixture of experts with a shared expert (4 routed
    # experts, top-2, sigmoid router), q/k norms on every head, rotary embeddings on half of each head, q/k/v biases
    "glm4moe-dense-shared": (
        Glm4MoeConfig,
        Glm4MoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            use_qk_norm=True,
            attention_bias=True,
            tie_word_embeddings=False,
        ),
    ),
    # a mixture of experts in every layer (4 experts, top-2), q/k norms over the whole projections
    "olmoe-sparse-qk-norm": (
        OlmoeConfig,
        OlmoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
    # Granite's multipliers around a mixture of experts in every layer (4 experts, top-2) at `block_sparse_moe`
    "granitemoe-multipliers": (
        GraniteMoeConfig,
        GraniteMoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            embedding_multiplier=3.0,
            residual_multiplier=0.4,
            attention_multiplier=0.5,
            logits_scaling=2.5,
            tie_word_embeddings=True,
        ),
    ),
    # Gated DeltaNet hybrid: a linear-attention layer (recurrent state in the cache, no inserted heads), then a
    # full-attention layer with gated head outputs, q/k norms, rotary embeddings on a quarter of each head; (1 + w)
    # norms
    "qwen3_5-linear-full": (
        Qwen3_5TextConfig,
        Qwen3_5ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            tie_word_embeddings=False,
        ),
    ),
    # the Qwen3.5 hybrid with a mixture of experts and a shared expert in every layer; the full-attention layer
    # first
    "qwen3_5moe-full-linear-sparse": (
        Qwen3_5MoeTextConfig,
        Qwen3_5MoeForCausalLM,
        dict(
            hidden_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            layer_types=["full_attention", "linear_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            tie_word_embeddings=False,
        ),
    ),
    # the Qwen3.5 hybrid layout with a sparse layer (shared expert) and a dense one (`mlp_only_layers`)
    "qwen3next-linear-full-sparse-dense": (
        Qwen3NextConfig,
        Qwen3NextForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            tie_word_embeddings=False,
        ),
    ),
    # multi-head latent attention (compressed queries, key/value latent, rotary channels after the others, values
    # narrower than keys), a dense layer 0 then shared + routed experts (`first_k_dense_replace`), grouped routing
    "deepseekv3-latent-attention": (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    ),
    # DeepSeek-V2's latent attention with complex rotary factors and uncompressed queries (`q_lora_rank` None, as
    # V2-Lite), a dense layer 0 then shared + routed experts
    "deepseekv2-latent-attention": (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    ),
    # a chunked rotating layer with L2 q/k norms and a dense MLP, then a full layer without rotary embeddings
    # (attention temperature tuning, scale raised so that it shows) and a mixture of experts with a shared expert
    "llama4-nope-chunked-moe": (
        Llama4TextConfig,
        Llama4ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=32,
            intermediate_size_mlp=64,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            no_rope_layers=[1, 0],
            attention_chunk_size=4,
            attn_scale=0.5,
            floor_scale=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
        ),
    ),
    # per-layer input embeddings; a sliding layer (window shorter than the test sequences) with 16-wide heads and 2
    # key/value heads, a global one with 32-wide heads and 1 key/value head whose keys double as values; then one
    # layer of each kind reusing the keys and values of the last earlier one of its kind (with a double-wide MLP);
    # w * x / rms(x) norms before and after each module, q/k/v norms, final-logit softcapping that bites. Padded
    # positions' original stream is exactly zero here, where each norm scales the inserted stream by eps ** -0.5:
    # through five norms a layer and four layers, an eps below 1e-2 takes it past float32's range there
    "gemma4-per-layer-shared-kv": (
        Gemma4TextConfig,
        Gemma4ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=96,
            rms_norm_eps=1e-2,
            final_logit_softcapping=0.5,
            tie_word_embeddings=True,
        ),
    ),
    # routed experts (4, top-2) beside the dense MLP in every layer, each with norms of its own; a sliding layer
    # with 16-wide heads then a global one with 32-wide heads; no per-layer inputs
    "gemma4-moe": (
        Gemma4TextConfig,
        Gemma4ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            hidden_size_per_layer_input=0,
            tie_word_embeddings=False,
        ),
    ),
}


def _first_config_of_each_architecture() -> list[str]:
    names = {}
    for name, (config_class, _, _) in BASE_MODELS.items():
        names.setdefault(config_class.model_type, name)
    return list(names.values())


# One tiny config per supported architecture, for the tests that run once per architecture.
ARCHITECTURE_BASES = _first_config_of_each_architecture()


def make_base(name: str, seed: int = 0, **overrides):
    config_class, model_class, sizes = BASE_MODELS[name]
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **sizes, **overrides})
    return model_class(config).eval()


def make_otter(base, seed: int = 1, noise: float = 0.05, **options):
    torch.manual_seed(seed)
    model = otter_hf.insert(base, **options)
    # Give the zero-initialised inserted blocks real values, so tests exercise every inserted path.
    with torch.no_grad():
        for parameter in model.otter_parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return model


def random_batch(batch_size: int, length: int, padding: str | None = None, seed: int = 0):
    """Token ids and an attention mask; with padding, each row after the first is shorter by one more token."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, COMMON["vocab_size"], (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padding is not None:
        for row in range(1, batch_size):
            pad = min(row, length - 1)
            if padding == "left":
                attention_mask[row, :pad] = 0
                input_ids[row, :pad] = PAD
            else:
                attention_mask[row, length - pad :] = 0
                input_ids[row, length - pad :] = PAD
    return input_ids, attention_mask


# A word-level tokenizer built offline whose ids fit the tiny models' vocabulary, with a small chat template.
TINY_WORDS = [
    *["i", "you", "it", "this", "that", "the", "a", "an", "is", "was", "are", "be", "my", "your", "me"],
    *["how", "what", "do", "please", "tell", "about", "write", "review"],
    *["answer", "movie", "film", "book", "food", "service"],
    *["day", "friend", "team", "work", "idea", "plan", "song", "trip"],
    *[".", ",", "!", "?", "and", "so", "very", "really", "not"],
    *["great", "good", "kind", "lovely", "wonderful", "helpful", "thanks", "happy", "glad", "nice", "love", "enjoyed"],
    *["bad", "awful", "terrible", "rude", "boring", "useless", "hate", "sad", "angry", "waste", "worst", "dull"],
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer of `TINY_WORDS` (the `tiny_tokenizer` fixture), with `<user>` / `<assistant>` turns."""
    specials = ["<pad>", "</s>", "<s>", "<unk>", "<user>", "<assistant>"]
    vocab = {token: index for index, token in enumerate(specials + list(TINY_WORDS))}
    assert len(vocab) <= COMMON["vocab_size"] and vocab["<pad>"] == PAD and vocab["</s>"] == EOS
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>"]})
    tokenizer.chat_template = (
        "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return tokenizer


def make_word_id_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary: token i is the word `w{i}`."""
    vocab = {"<pad>": COMMON["pad_token_id"], "</s>": COMMON["eos_token_id"], "<s>": COMMON["bos_token_id"]}
    vocab.update({f"w{index}": index for index in range(len(vocab), COMMON["vocab_size"])})
    backend = Tokenizer(WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `otter-hf *argv` in this process: its exit status, standard output and standard error."""
    capsys.readouterr()  # drop what earlier steps printed
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# Preference data in the tiny tokenizer's words.
GOOD = [
    "it was great !",
    "so kind and helpful .",
    "i really enjoyed it !",
    "what a lovely day .",
    "thanks , that is wonderful .",
]
BAD = ["it was awful .", "so rude and useless .", "i really hate it .", "what a boring day .", "the worst , a waste ."]
QUESTIONS = ["how was the movie ?", "what do you think of my idea ?", "tell me about your day .", "how was the food ?"]


def conversational_pairs(n: int = 20) -> Dataset:
    rows = [
        {
            "prompt": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "chosen": [{"role": "assistant", "content": GOOD[i % len(GOOD)]}],
            "rejected": [{"role": "assistant", "content": BAD[(i + 1) % len(BAD)]}],
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def trainer_config(config_class, tmp_path, **overrides):
    """A short, quiet CPU run of any Otter trainer config: 12 steps of 4 rows, nothing saved or reported."""
    options = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    return config_class(**{**options, **overrides})


def draft_config(tmp_path, **overrides) -> OtterDraftConfig:
    """A short, quiet CPU run of the draft-head trainer: 8 steps of 2 rows at a high learning rate."""
    options = dict(
        max_steps=8,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=4,
        disable_tqdm=True,
    )
    return OtterDraftConfig(str(tmp_path), **{**options, **overrides})


class FakeHub:
    """The parts of `HfApi` that uploads use, committing into a local folder laid out as the huggingface_hub
    cache, so that offline downloads (`hf_hub_download`, `snapshot_download`, `from_pretrained`) read the pushed
    repositories through their real code paths."""

    def __init__(self, cache_dir):
        self.cache_dir = cache_dir
        self.commits = []  # (repo_id, commit message, files in the commit)

    def __call__(self, *args, **kwargs):  # stands in for the HfApi class
        return self

    def repo_folder(self, repo_id: str) -> str:
        return os.path.join(self.cache_dir, "models--" + repo_id.replace("/", "--"))

    def files(self, repo_id: str) -> dict[str, bytes]:
        snapshot = self._head_snapshot(repo_id)
        files = {}
        for root, _, names in os.walk(snapshot):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as file:
                    files[os.path.relpath(path, snapshot)] = file.read()
        return files

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        os.makedirs(os.path.join(self.repo_folder(repo_id), "refs"), exist_ok=exist_ok)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(
        self, repo_id, operations, *, commit_message, commit_description=None, revision=None, create_pr=False, **kwargs
    ):
        contents = {}
        for operation in operations:
            with operation.as_file() as file:
                contents[operation.path_in_repo] = file.read()
        digest = hashlib.sha1(repo_id.encode())
        for path, data in sorted(contents.items()):
            digest.update(path.encode() + data)
        oid = digest.hexdigest()
        snapshot = os.path.join(self.repo_folder(repo_id), "snapshots", oid)
        previous = self._head_snapshot(repo_id)
        if previous is not None:
            shutil.copytree(previous, snapshot, dirs_exist_ok=True)
        for path, data in contents.items():
            os.makedirs(os.path.dirname(os.path.join(snapshot, path)), exist_ok=True)
            with open(os.path.join(snapshot, path), "wb") as file:
                file.write(data)
        with open(os.path.join(self.repo_folder(repo_id), "refs", revision or "main"), "w") as file:
            file.write(oid)
        self.commits.append((repo_id, commit_message, sorted(contents)))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
            commit_message=commit_message,
            commit_description=commit_description or "",
            oid=oid,
        )

    def _head_snapshot(self, repo_id: str, revision: str = "main") -> str | None:
        ref = os.path.join(self.repo_folder(repo_id), "refs", revision)
        if not os.path.isfile(ref):
            return None
        with open(ref) as file:
            return os.path.join(self.repo_folder(repo_id), "snapshots", file.read())
