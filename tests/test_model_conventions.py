"""Conventions transformers' own models follow, kept by the Otter classes: tuple outputs, dtype casts, resizing,
the forward signature, gradient checkpointing, loading a base checkpoint."""

import inspect
import warnings

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
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


def test_the_backbone_shows_the_base_forward_signature(base_name):
    backbone = make_otter(make_base(base_name)).base_model
    base_class = next(cls for cls in type(backbone).__mro__ if cls.__module__.startswith("transformers."))
    assert inspect.signature(backbone.forward) == inspect.signature(base_class.forward.__get__(backbone))
    assert backbone.main_input_name == "input_ids"


def test_sequence_classification_returns_a_tuple_with_return_dict_false():
    view = otter_hf.sequence_classification_view(make_otter(make_base("llama-gqa-tied")))
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    with torch.no_grad():
        as_dict = view(input_ids=input_ids, attention_mask=attention_mask)
        as_tuple = view(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.logits)


def test_lm_labels_on_a_frozen_model_are_refused_with_the_way_to_train():
    otter = make_otter(make_base("llama-gqa-tied"))
    input_ids, _ = random_batch(2, 6)
    with pytest.raises(ValueError, match="Otter trainers"):
        otter(input_ids=input_ids, labels=input_ids)
    with torch.no_grad():  # evaluating the base's loss is fine
        assert otter(input_ids=input_ids, labels=input_ids).loss is not None
    otter.lm_head.weight.requires_grad_(True)  # a trainable base parameter: the loss trains it
    otter(input_ids=input_ids, labels=input_ids).loss.backward()
    assert otter.lm_head.weight.grad is not None


def test_a_loss_on_the_frozen_base_output_alone_names_the_trainer_that_fits():
    base = make_base("llama-gqa-tied")
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 6)
    outputs = otter(input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        assert torch.equal(outputs.logits, base(input_ids=input_ids, attention_mask=attention_mask).logits)
    with pytest.raises(ValueError, match="SFTTrainer .* `OtterExpertTrainer` for SFT data"):
        outputs.logits.logsumexp(-1).mean().backward(retain_graph=True)
    outputs.value.mean().backward()  # a loss on the inserted heads trains them
    assert otter.v_head.summary.weight.grad is not None
    backbone_only = otter.model(input_ids=input_ids, attention_mask=attention_mask)  # as TRL's fused LM head runs it
    with pytest.raises(ValueError, match="SFTTrainer"):
        otter.lm_head(backbone_only.last_hidden_state).mean().backward()
    # The logits stay a tensor of their own that code may edit in place (masking a token), gradients on.
    edited = otter(input_ids=input_ids, attention_mask=attention_mask)
    edited.logits[:, -1, 0] = -torch.inf
    assert torch.isinf(edited.logits[:, -1, 0]).all()
    edited.value.mean().backward()


def test_trl_sft_trainer_on_an_otter_model_fails_with_one_clear_error(tmp_path, tiny_tokenizer):
    from trl import SFTConfig, SFTTrainer

    otter = make_otter(make_base("llama-gqa-tied"))
    rows = Dataset.from_dict({"text": ["the cat sat on the mat"] * 4})
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = SFTTrainer(otter, args=config, train_dataset=rows, processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="`OtterExpertTrainer` for SFT data"):
        trainer.train()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_trainable_base_parameters(base_name, use_reentrant):
    """LoRA's setup: base parameters train too. Checkpointing recomputes each decoder layer in backward, capture
    hooks included; the gradients are those of the run without checkpointing (the reentrant variant is run as the
    non-reentrant one, which keeps the gradients through the captures)."""
    otter = make_otter(make_base(base_name)).train()
    for parameter in otter.parameters():
        parameter.requires_grad_(True)
    input_ids, attention_mask = random_batch(2, 6)

    def gradients():
        torch.manual_seed(0)  # the same dropout masks (GPT-2 trains with dropout)
        otter.zero_grad(set_to_none=True)
        outputs = otter(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
        (outputs.loss + outputs.value.square().mean()).backward()
        return {name: p.grad.clone() for name, p in otter.named_parameters() if p.grad is not None}

    expected = gradients()
    otter.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = gradients()
    assert checkpointed.keys() == expected.keys()
    assert dict(otter.otter_named_parameters()).keys() <= expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, msg=name)


# Bases whose saved checkpoint the Otter class cannot load directly (`otter_hf.insert` takes the loaded base).
BASE_LAYOUTS_NOT_MAPPED = {"mixtral-sparse"}


def test_loading_a_base_checkpoint_gives_what_insert_gives(tmp_path, base_name):
    base = make_base(base_name)
    base.save_pretrained(tmp_path)
    otter_class = type(otter_hf.insert(make_base(base_name)))
    if base_name in BASE_LAYOUTS_NOT_MAPPED:
        # Mixtral's checkpoint renamings do not carry over to the Otter class: refused, never loaded half.
        with pytest.raises(ValueError, match="left base weights unloaded"):
            otter_class.from_pretrained(tmp_path, inserted_hidden_size=8)
        return
    loaded, info = otter_class.from_pretrained(tmp_path, output_loading_info=True, inserted_hidden_size=8)
    torch.manual_seed(0)
    inserted = otter_hf.insert(base, inserted_hidden_size=8)
    torch.manual_seed(1)
    # What `insert` draws at random differs between draws; everything else (copies, zeros, the base) is the same.
    drawn_again = otter_hf.insert(make_base(base_name), inserted_hidden_size=8).state_dict()
    assert set(info["missing_keys"]) == set(inserted.otter_state_dict())
    assert loaded.state_dict().keys() == inserted.state_dict().keys()
    for name, tensor in inserted.state_dict().items():
        decided = tensor == drawn_again[name]
        assert torch.equal(loaded.state_dict()[name][decided], tensor[decided]), name
    assert loaded.config.base_model_fingerprint == inserted.config.base_model_fingerprint
    assert not any(p.requires_grad for name, p in loaded.named_parameters() if name in base.state_dict())
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
            base(input_ids=input_ids, attention_mask=attention_mask).logits,
        )


def test_an_otter_checkpoint_missing_inserted_weights_is_refused_but_a_backbone_save_gets_heads(tmp_path):
    otter = make_otter(make_base("llama-gqa-tied"))
    otter.base_model.save_pretrained(tmp_path / "backbone")
    loaded, info = type(otter).from_pretrained(tmp_path / "backbone", output_loading_info=True)
    assert set(info["missing_keys"]) == {name for name in otter.state_dict() if name.startswith("v_head.")}
    assert torch.equal(
        loaded.model.layers[0].inserted_attn.qkv_proj.weight, otter.model.layers[0].inserted_attn.qkv_proj.weight
    )
    otter.save_pretrained(tmp_path / "full")
    weights = load_file(tmp_path / "full" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "inserted_mlp" not in k}, tmp_path / "full" / "model.safetensors")
    with pytest.raises(ValueError, match="missing model.layers.0.inserted_mlp"):
        type(otter).from_pretrained(tmp_path / "full")
