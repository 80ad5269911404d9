"""`otter_hf.insert`: which parameters are inserted, trainable and how they start."""

import re

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

import otter_hf
from otter_hf.modeling import OTTER_CLASSES_BY_BASE_MODEL_TYPE
from otter_hf.modeling.initialization import copied_head_sources
from tests.helpers import BASE_MODELS, make_base, make_otter, random_batch


def test_only_inserted_parameters_are_trainable(base_name):
    otter = otter_hf.insert(make_base(base_name))
    trainable = {name for name, p in otter.named_parameters() if p.requires_grad}
    inserted = {name for name, _ in otter.otter_named_parameters()}
    assert trainable == inserted
    assert "v_head.summary.weight" in inserted
    assert any(".inserted_attn." in name for name in inserted)
    # The base attention's own parameters stay frozen; only inserted weights on its norms (OLMo's q/k) train.
    assert not any(name.startswith("model.layers.0.self_attn.") and ".inserted_" not in name for name in inserted)
    assert otter.num_inserted_parameters() == sum(p.numel() for p in otter.otter_parameters())
    assert 0 < otter.inserted_parameter_fraction() < 1


def test_gradients_reach_only_inserted_parameters():
    otter = make_otter(make_base("qwen2-bias"))
    otter.train()
    input_ids, attention_mask = random_batch(2, 6)
    otter(input_ids, attention_mask=attention_mask).value.sum().backward()
    for name, parameter in otter.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_insert_shares_base_tensors_and_keeps_the_base_untouched():
    base = make_base("llama-mha-untied")
    otter = otter_hf.insert(base)
    assert otter.model.layers[0].mlp.up_proj.weight.data_ptr() == base.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert all(p.requires_grad for p in base.parameters())  # the caller's model object is not frozen
    assert otter.config.base_model_fingerprint == otter.base_weights_fingerprint()


def test_copy_init_makes_the_inserted_stream_follow_the_copied_dimensions(base_name):
    base = make_base(base_name)
    otter = otter_hf.insert(
        base, inserted_hidden_size=16, inserted_num_attention_heads=2, inserted_intermediate_size=24
    )
    input_ids, attention_mask = random_batch(2, 7)
    with torch.no_grad():
        output = otter(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    # At insertion the inserted stream equals the first 16 original dimensions, layer after layer.
    for original, inserted in zip(output.hidden_states[:-1], output.inserted_hidden_states[:-1]):
        torch.testing.assert_close(inserted, original[..., :16], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        output.inserted_hidden_states[-1], output.hidden_states[-1][..., :16], atol=1e-5, rtol=1e-4
    )


def test_copied_heads_attend_as_their_sources(base_name):
    assert_copied_heads_attend_as_their_sources(make_base(base_name))


def test_copied_heads_skip_the_query_key_norms_their_layer_does_not_apply():
    # GLM-4-MoE's per-head q/k norms are optional (`use_qk_norm`); the tiny config has them.
    assert_copied_heads_attend_as_their_sources(make_base("glm4moe-dense-shared", use_qk_norm=False))


def assert_copied_heads_attend_as_their_sources(base):
    # At insertion each inserted head computes what its source head does: the same q/k norms, rotation (or none,
    # in a layer whose base attention skips it), scale, window, sinks and mask. Two key/value heads make the query
    # heads copy original heads 0 and 2 where the base has groups of two, and norm weights away from one tell
    # slices apart.
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    otter = otter_hf.insert(
        base, inserted_hidden_size=16, inserted_num_attention_heads=2, inserted_num_key_value_heads=2
    )
    layout = otter.base_model.otter_layout
    original_heads, inserted_heads = [], []
    # Every layer but a hybrid's linear-attention ones.
    attention_layers = [
        (index, layer) for index, layer in enumerate(otter.otter_decoder_layers()) if layout.has_inserted_heads(layer)
    ]
    for _, layer in attention_layers:
        layer.get_submodule(layout.attention_output).register_forward_pre_hook(
            lambda module, args: original_heads.append(args[0])
        )
        layer.inserted_attn.o_proj.register_forward_pre_hook(lambda module, args: inserted_heads.append(args[1]))
    input_ids, attention_mask = random_batch(2, 7)
    with torch.no_grad():
        otter(input_ids, attention_mask=attention_mask)
    assert len(original_heads) == len(inserted_heads) == len(attention_layers) > 0
    for (index, layer), original, inserted in zip(attention_layers, original_heads, inserted_heads):
        # Each layer's heads as its base heads are (Gemma 4: larger heads, fewer key/value heads in global layers),
        # and a head's output as wide as its values (narrower than its queries and keys in DeepSeek's latent
        # attention).
        shape = layout.attention_shape(otter.config, index)
        query_sources, _ = copied_head_sources(otter.config, shape.num_key_value_heads)
        head_dim = layer.inserted_attn.value_head_dim
        for head, source in enumerate(query_sources):
            torch.testing.assert_close(
                inserted[..., head * head_dim : (head + 1) * head_dim],
                original[..., source * head_dim : (source + 1) * head_dim],
                atol=1e-5,
                rtol=1e-4,
            )


@pytest.mark.parametrize("base_name", ["deepseekv3-latent-attention", "deepseekv2-latent-attention"])
def test_latent_attention_needs_a_key_and_value_per_head(base_name):
    # The latent is expanded into one key and value per query head, which the inserted heads copy one by one.
    base = make_base(base_name)
    base.config.num_key_value_heads = 2
    with pytest.raises(ValueError, match="num_key_value_heads=2 for num_attention_heads=4"):
        otter_hf.insert(base)


def test_copied_heads_follow_grouped_query_attention():
    otter = otter_hf.insert(make_base("llama-gqa-tied"), inserted_num_attention_heads=4, inserted_num_key_value_heads=2)
    query_sources, kv_sources = copied_head_sources(otter.config)
    # original: 4 query heads over 2 kv heads (groups of 2); each inserted query copies a head of its kv's group
    assert kv_sources == [0, 1]
    assert query_sources == [0, 1, 2, 3]
    head_dim = otter.config.head_dim
    qkv = otter.model.layers[1].inserted_attn.qkv_proj.weight
    original_k = otter.model.layers[1].self_attn.k_proj.weight
    k_rows = qkv[4 * head_dim : 5 * head_dim, : otter.config.hidden_size]
    assert torch.equal(k_rows, original_k[:head_dim])
    assert torch.count_nonzero(qkv[:, otter.config.hidden_size :]) == 0


@pytest.mark.parametrize("method", ["normal", "random"])
def test_normal_and_random_init_do_not_copy(method):
    otter = otter_hf.insert(make_base("llama-gqa-tied"), init=method, inserted_hidden_size=16)
    assert otter.config.inserted_init == method
    embedding = otter.model.embed_tokens
    assert not torch.allclose(embedding.inserted_weight, embedding.weight[:, :16])
    std = embedding.inserted_weight.std().item()
    assert (abs(std - otter.config.initializer_range) < 0.005) if method == "normal" else (abs(std - 1.0) < 0.1)
    qkv = otter.model.layers[0].inserted_attn.qkv_proj.weight
    assert torch.count_nonzero(qkv[:, otter.config.hidden_size :]) == qkv[:, otter.config.hidden_size :].numel()


def test_insert_loads_a_model_id_or_path(tmp_path):
    base = make_base("qwen2-bias")
    base.save_pretrained(tmp_path)
    otter = otter_hf.insert(str(tmp_path), inserted_hidden_size=8, dtype=torch.float32)
    assert isinstance(otter, otter_hf.OtterQwen2ForCausalLMWithValueHead)
    assert otter.config.inserted_hidden_size == 8
    assert otter.config.base_model_name_or_path == str(tmp_path)
    input_ids, _ = random_batch(1, 5)
    with torch.no_grad():
        assert torch.equal(otter(input_ids).logits, AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids).logits)


def test_unsupported_architecture_names_the_supported_ones():
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    )
    supported = ", ".join(sorted(OTTER_CLASSES_BY_BASE_MODEL_TYPE))
    with pytest.raises(ValueError, match=f"'gpt_neox'.*{supported}"):
        otter_hf.insert(neox)


def test_every_supported_architecture_has_a_test_config():
    # The per-architecture tests run on BASE_MODELS, the vision-language ones on test_vision_language's FAMILIES; an
    # architecture without an entry there would go untested.
    from tests.test_vision_language import FAMILIES

    tested = {config_class.model_type for config_class, _, _ in BASE_MODELS.values()} | set(FAMILIES)
    assert tested == set(OTTER_CLASSES_BY_BASE_MODEL_TYPE)


def test_a_capture_point_that_never_fires_is_an_error_naming_it(monkeypatch):
    # Stands for a future transformers that computes the attention output through another module than the one
    # Otter observes: the same weights, in a module without Otter's hook.
    otter = make_otter(make_base("llama-gqa-tied"))
    attention = otter.model.layers[1].self_attn
    unobserved = torch.nn.Linear(attention.o_proj.in_features, attention.o_proj.out_features, bias=False)
    unobserved.load_state_dict(attention.o_proj.state_dict())
    monkeypatch.setattr(attention, "o_proj", unobserved)
    input_ids, _ = random_batch(1, 4)
    with pytest.raises(RuntimeError, match=f"`layers.1.self_attn.o_proj`.*transformers {transformers.__version__}"):
        otter(input_ids)
    with otter.otter_disabled():  # the base computation alone still runs
        otter(input_ids)


def test_inserting_into_an_otter_model_says_it_already_is_one(tmp_path):
    otter = make_otter(make_base("qwen2-bias"))
    with pytest.raises(ValueError, match="already is an Otter model \\('otter_qwen2'"):
        otter_hf.insert(otter)
    otter.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already is an Otter model"):
        otter_hf.insert(str(tmp_path))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(inserted_num_attention_heads=3, inserted_num_key_value_heads=2), "multiple of"),
        (dict(inserted_num_attention_heads=0), "positive integer"),
        (dict(inserted_hidden_size=-4), "positive integer"),
        (dict(inserted_hidden_size=1000), "inserted_hidden_size` <= `hidden_size"),
        (dict(inserted_intermediate_size=5000), "inserted_intermediate_size` <= `intermediate_size"),
        (dict(inserted_init="xavier"), "one of"),
        (dict(value_head_dropout=1.5), "value_head_dropout"),
    ],
)
def test_impossible_sizes_fail_before_any_allocation(options, message, monkeypatch):
    base = make_base("llama-gqa-tied")

    def no_allocation(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(otter_hf.OtterLlamaForCausalLMWithValueHead, "_from_config", no_allocation)
    with pytest.raises(ValueError, match=message):
        otter_hf.insert(base, **options)


def test_a_misspelt_insertion_option_is_named_before_loading(tmp_path, monkeypatch):
    base = make_base("llama-gqa-tied")
    base.save_pretrained(tmp_path / "base")
    make_otter(base).save_otter(tmp_path / "inserted")

    def no_loading(*args, **kwargs):
        raise AssertionError("the base was loaded before the options were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(
        TypeError,
        match=re.escape("Unknown insertion option 'inserted_hidden_sze'; did you mean 'inserted_hidden_size'?"),
    ):
        otter_hf.insert(str(tmp_path / "base"), inserted_hidden_sze=8)
    with pytest.raises(TypeError, match="'inserted_hidden_size' cannot be passed here"):
        otter_hf.load_otter(str(tmp_path / "base"), tmp_path / "inserted", inserted_hidden_size=8)


@pytest.mark.parametrize("path", ["./no-such-model", "/no/such/model", "../no-such-model"])
def test_an_unknown_local_path_fails_at_once_without_the_hub(path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for a local path")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_hub)
    with pytest.raises(FileNotFoundError, match=f"No model at {re.escape(path)}: there is no such folder"):
        otter_hf.insert(path)


def test_loading_options_need_a_model_id():
    with pytest.raises(TypeError, match="loading options"):
        otter_hf.insert(make_base("llama-gqa-tied"), dtype=torch.bfloat16)


def test_activation_checkpointing_gives_the_same_gradients():
    input_ids, attention_mask = random_batch(2, 6)
    gradients = []
    for checkpointing in (False, True):
        otter = make_otter(make_base("llama-gqa-tied"))
        if checkpointing:
            # Its name on every supported transformers (5.23 added `activation_checkpointing_enable`).
            otter.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        otter.train()
        otter(input_ids, attention_mask=attention_mask, use_cache=False).value.sum().backward()
        gradients.append({name: p.grad.clone() for name, p in otter.otter_named_parameters()})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5)


# Draft heads repeat what the causal LM does to the LM head's output: Gemma's softcapping, Granite's logit scaling.
@pytest.mark.parametrize("name", ["qwen2-bias", "gemma3-sliding-softcap", "granite-multipliers"])
def test_draft_heads_are_inserted_parameters_and_start_as_the_lm_head(name):
    otter = otter_hf.insert(make_base(name), num_draft_heads=3)
    assert {name for name, _ in otter.otter_named_parameters() if name.startswith("draft_heads.")}
    input_ids, _ = random_batch(2, 5)
    with torch.no_grad():
        output = otter(input_ids, output_draft_logits=True, logits_to_keep=2)
    assert output.draft_logits.shape == (2, 2, 3, otter.config.vocab_size)
    for head in range(3):
        torch.testing.assert_close(output.draft_logits[:, :, head], output.logits)
    with pytest.raises(ValueError, match="needs draft heads"):
        otter_hf.insert(make_base("qwen2-bias"))(input_ids, output_draft_logits=True)


def test_backward_stays_out_of_the_frozen_base_computation():
    otter = make_otter(make_base("llama-gqa-tied"))
    otter.train()
    input_ids, attention_mask = random_batch(2, 6)
    base_backward_calls = []
    for layer in otter.model.layers:
        for module in (layer.self_attn.q_proj, layer.mlp.down_proj):
            module.register_full_backward_hook(lambda *args: base_backward_calls.append(1))
    otter(input_ids, attention_mask=attention_mask).value.sum().backward()
    assert base_backward_calls == []
    detached_gradients = {name: p.grad.clone() for name, p in otter.otter_named_parameters()}

    # With a base parameter unfrozen the original stream keeps its gradient; the inserted gradients are the same.
    otter.zero_grad()
    otter.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    otter(input_ids, attention_mask=attention_mask).value.sum().backward()
    assert base_backward_calls
    assert otter.model.layers[0].self_attn.q_proj.weight.grad is not None
    for name, parameter in otter.otter_named_parameters():
        torch.testing.assert_close(parameter.grad, detached_gradients[name], atol=1e-6, rtol=1e-5)
