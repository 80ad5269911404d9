"""Conventions transformers' own models follow, kept by the Otter classes: tuple outputs, dtype casts, resizing."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import otter_hf
from otter_hf.modeling import is_inserted_parameter
from tests.helpers import make_base, make_otter, random_batch


def _same(left, right) -> bool:
    if isinstance(left, torch.Tensor):
        return torch.equal(left, right)
    if isinstance(left, (tuple, list)):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right))
    return type(left) is type(right)  # a cache object: compared by its type only


def test_tuple_output_holds_the_base_fields_first_in_the_base_order(base_name):
    base = make_base(base_name, attn_implementation="eager")
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    options = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    with torch.no_grad():
        expected = base(**options, output_attentions=True, return_dict=False)
        as_dict = otter(**options, output_attentions=True)
        as_tuple = otter(**options, output_attentions=True, return_dict=False)
        backbone_tuple = otter.base_model(**options, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    assert _same(as_tuple[: len(expected)], expected)
    assert torch.equal(as_tuple[len(expected) + 1], as_dict.value)  # after the inserted hidden states
    assert isinstance(backbone_tuple, tuple) and torch.equal(backbone_tuple[0], as_dict.hidden_states[-1])


def test_casting_the_model_keeps_the_value_head_in_float32():
    otter = make_otter(make_base("llama-gqa-tied"))
    for cast in (lambda model: model.to(torch.bfloat16), lambda model: model.half()):
        cast(otter)
        assert otter.v_head.summary.weight.dtype == torch.float32
        assert otter.model.layers[0].inserted_attn.qkv_proj.weight.dtype != torch.float32
        input_ids, _ = random_batch(1, 4)
        with torch.no_grad():
            assert otter(input_ids=input_ids).value.dtype == torch.float32


def test_resizing_token_embeddings_resizes_the_inserted_rows_and_reloads(tmp_path):
    otter = make_otter(make_base("llama-gqa-tied"), token_reward_head=True)
    old_size = otter.config.vocab_size
    inserted_before = otter.model.embed_tokens.inserted_weight.detach().clone()
    otter.resize_token_embeddings(old_size + 5)
    inserted = otter.model.embed_tokens.inserted_weight
    assert inserted.shape[0] == old_size + 5 and inserted.requires_grad
    assert torch.equal(inserted[:old_size], inserted_before)
    torch.testing.assert_close(inserted[old_size], inserted_before.mean(0))
    assert torch.equal(otter.token_reward_head.proj.weight[old_size:], torch.zeros(5, inserted.shape[1]))
    new_token = torch.tensor([[old_size + 4, 5, 6]])
    with torch.no_grad():
        output = otter(input_ids=new_token, output_token_reward_logits=True)
    assert output.token_reward_logits.shape[-1] == old_size + 5
    otter.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.model.embed_tokens.inserted_weight, inserted)
    with torch.no_grad():
        # The same weights, in freshly allocated tensors: float32 matmuls may round the last bit differently.
        torch.testing.assert_close(reloaded(input_ids=new_token).value, output.value, rtol=1e-6, atol=1e-6)


def test_guidance_at_weight_zero_decodes_as_the_base_with_beams_too():
    base = make_base("llama-gqa-tied")
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    beams = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=2)
    expected = base.generate(input_ids, attention_mask=attention_mask, **beams)
    assert torch.equal(otter.generate(input_ids, attention_mask=attention_mask, reward_weight=0, **beams), expected)


@pytest.mark.parametrize("guidance", [{"reward_weight": 1.0}, {"token_reward_weight": 1.0}])
def test_assisted_decoding_with_guidance_is_refused_up_front(guidance):
    otter = make_otter(make_base("llama-gqa-tied"), token_reward_head=True)
    input_ids, attention_mask = random_batch(1, 5)
    with pytest.raises(ValueError, match="assisted decoding"):
        otter.generate(
            input_ids, attention_mask=attention_mask, assistant_model=make_base("llama-gqa-tied"), **guidance
        )


def test_reward_guided_decoding_passes_the_cache_under_the_name_transformers_reads():
    otter = make_otter(make_base("llama-gqa-tied"))
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        otter.generate(input_ids, attention_mask=attention_mask, reward_weight=1.0, max_new_tokens=3, pad_token_id=0)


def test_lora_with_the_exclusion_list_leaves_every_inserted_module_alone():
    peft = pytest.importorskip("peft")
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for targets in ("all-linear", projections):
        otter = make_otter(make_base("llama-gqa-tied"), num_draft_heads=1, token_reward_head=True)
        config = peft.LoraConfig(target_modules=targets, exclude_modules=otter_hf.PEFT_EXCLUDE_MODULES, r=2)
        adapted = [
            name for name, module in peft.get_peft_model(otter, config).named_modules() if hasattr(module, "lora_A")
        ]
        assert adapted and not [name for name in adapted if is_inserted_parameter(name)]
        assert {name.rsplit(".", 1)[-1] for name in adapted} == set(projections)
