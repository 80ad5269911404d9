"""The registry of inserted heads: each entry alone makes its head a config field, an insertion and CLI option,
a trainable inserted module in its dtype, an output field, and part of every save."""

import dataclasses
import inspect
import re

import pytest
import torch

import otter_hf
from otter_hf.cli import _insertion_options, build_parser
from otter_hf.lifecycle.insertion import INSERTION_OPTIONS
from otter_hf.modeling import OtterCausalLMOutputWithValue, is_inserted_parameter, sequence_classification_view
from otter_hf.modeling.inserted_heads import INSERTED_HEADS
from tests.helpers import make_base, make_otter, random_batch

# Options under which a config builds every registered head; a new head that needs one belongs here.
BUILD_EVERY_HEAD = {
    "num_draft_heads": 2,
    "num_recurrent_drafts": 2,
    "draft_vocab_size": 40,
    "token_reward_head": True,
    "expert_heads": True,
}
# Heads whose output skips positions: the recurrent draft head reads the token after each position, so the last
# one has none.
POSITIONS_SKIPPED = {"recurrent_draft_logits": 1}


@pytest.fixture(scope="module")
def otter_bf16():
    return make_otter(make_base("llama-gqa-tied").to(torch.bfloat16), **BUILD_EVERY_HEAD)


@pytest.fixture(params=INSERTED_HEADS, ids=lambda head: head.attribute)
def head(request):
    return request.param


def _request(head) -> dict:
    return {} if head.computed_by_default else {head.request_argument: True}


def test_every_head_is_built_trainable_inserted_and_in_its_dtype(otter_bf16, head):
    module = getattr(otter_bf16, head.attribute)
    assert isinstance(module, head.module_class)
    parameters = dict(module.named_parameters(prefix=head.attribute))
    assert parameters
    assert all(is_inserted_parameter(name) and parameter.requires_grad for name, parameter in parameters.items())
    expected_dtype = torch.float32 if head.keep_in_fp32 else torch.bfloat16
    assert {parameter.dtype for parameter in parameters.values()} == {expected_dtype}


def test_every_head_fills_its_output_field(otter_bf16, head):
    input_ids, attention_mask = random_batch(2, 5)
    with torch.no_grad():
        requested = otter_bf16(input_ids, attention_mask=attention_mask, **_request(head))
        plain = otter_bf16(input_ids, attention_mask=attention_mask)
        with otter_bf16.otter_disabled():
            disabled = otter_bf16(input_ids, attention_mask=attention_mask)
    assert head.output_field in {field.name for field in dataclasses.fields(OtterCausalLMOutputWithValue)}
    assert getattr(requested, head.output_field).shape[:2] == (2, 5 - POSITIONS_SKIPPED.get(head.output_field, 0))
    assert (getattr(plain, head.output_field) is not None) == head.computed_by_default
    assert getattr(disabled, head.output_field) is None


def test_a_head_the_config_does_not_build_is_absent_and_cannot_be_requested(head):
    unbuilt = [h for h in INSERTED_HEADS if not h.is_built(otter_hf.insert(make_base("llama-gqa-tied")).config)]
    if head not in unbuilt:
        pytest.skip("built by the default options")
    otter = otter_hf.insert(make_base("llama-gqa-tied"))
    assert getattr(otter, head.attribute) is None
    assert not any(name.startswith(head.attribute + ".") for name, _ in otter.named_parameters())
    with pytest.raises(ValueError, match=f"`{head.request_argument}=True` needs"):
        otter(random_batch(1, 3)[0], **_request(head))


def test_head_options_are_config_fields_insertion_options_and_cli_options(head, tmp_path):
    config_fields = {field.name: field for field in dataclasses.fields(otter_hf.OtterLlamaConfig)}
    for option in head.options:
        assert config_fields[option.name].default == option.default
        assert option.name in INSERTION_OPTIONS
        flag = "--" + option.name.replace("_", "-")
        value = True if option.type is bool else option.type(BUILD_EVERY_HEAD.get(option.name, option.default))
        argv = ["insert", "--output", str(tmp_path), flag] + ([] if option.type is bool else [str(value)])
        assert _insertion_options(build_parser().parse_args(argv))[option.name] == value
        if option.type is not bool:  # a bool's type is all there is to check
            with pytest.raises(ValueError, match=re.escape(f"`{option.name}` must be {option.requirement}, got -1")):
                otter_hf.insert(make_base("llama-gqa-tied"), **{option.name: option.type(-1)})


def test_every_head_is_saved_by_save_otter_and_save_pretrained(head, tmp_path):
    base = make_base("qwen2-bias")
    otter = make_otter(base, **BUILD_EVERY_HEAD)
    otter.save_otter(tmp_path / "inserted")
    otter.save_pretrained(tmp_path / "full")
    reattached = otter_hf.load_otter(base, tmp_path / "inserted")
    reloaded = type(otter).from_pretrained(tmp_path / "full")
    expected = dict(getattr(otter, head.attribute).state_dict())
    for model in (reattached, reloaded):
        loaded = getattr(model, head.attribute).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_the_sequence_classification_view_shares_every_head(otter_bf16, head):
    view = sequence_classification_view(otter_bf16)
    assert getattr(view, head.attribute) is getattr(otter_bf16, head.attribute)


def test_output_fields_and_forward_arguments_are_written_out_for_every_head():
    output_fields = {field.name for field in dataclasses.fields(OtterCausalLMOutputWithValue)}
    forward_parameters = inspect.signature(otter_hf.OtterLlamaForCausalLMWithValueHead.forward).parameters
    for head in INSERTED_HEADS:
        assert head.output_field in output_fields, head.attribute
        assert f"{head.output_field} (" in OtterCausalLMOutputWithValue.__doc__, head.attribute
        if not head.computed_by_default:
            assert forward_parameters[head.request_argument].default is False, head.attribute
    requests = {name for name in forward_parameters if name.startswith("output_")}
    assert requests == {head.request_argument for head in INSERTED_HEADS if not head.computed_by_default}
