import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import otter_hf

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


@pytest.fixture(params=sorted(BASE_MODELS))
def base_name(request):
    return request.param


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
TINY_WORDS = ["i", "you", "it", "this", "that", "the", "a", "an", "is", "was", "are", "be", "my", "your", "me", "how", "what", "do", "please", "tell", "about", "write", "review", "answer", "movie", "film", "book", "food", "service", "day", "friend", "team", "work", "idea", "plan", "song", "trip", ".", ",", "!", "?", "and", "so", "very", "really", "not", "great", "good", "kind", "lovely", "wonderful", "helpful", "thanks", "happy", "glad", "nice", "love", "enjoyed", "bad", "awful", "terrible", "rude", "boring", "useless", "hate", "sad", "angry", "waste", "worst", "dull"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>", "<user>", "<assistant>"]
    vocab = {token: index for index, token in enumerate(specials + list(TINY_WORDS))}
    assert len(vocab) <= COMMON["vocab_size"] and vocab["<pad>"] == PAD and vocab["</s>"] == EOS
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>"]})
    tokenizer.chat_template = (
        "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return tokenizer


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()
