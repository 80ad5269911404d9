"""Otter models on bases loaded with a `device_map`: every inserted parameter beside the base module it belongs to,
the original logits those of the base loaded the same way, and offloaded weights refused rather than read empty."""

import pytest
import torch
from accelerate import cpu_offload, init_empty_weights
from transformers import AutoModelForCausalLM

import otter_hf
from otter_hf.lifecycle.insertion import InsertedPlacement
from tests.helpers import BASE_MODELS, make_base, make_otter, random_batch

NAME = "llama-mha-untied"  # three layers: an offloaded one between two in memory
MODULES = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm", "lm_head"]


def per_module_map(**devices) -> dict:
    """A device map naming each block of the tiny Llama, on the CPU unless `devices` says otherwise."""
    return {module: devices.get(module.replace(".", "_"), "cpu") for module in [*MODULES, "model.rotary_emb"]}


@pytest.fixture
def base_folder(tmp_path):
    folder = tmp_path / "base"
    make_base(NAME).save_pretrained(folder)
    return folder


def outputs(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask)


def test_a_per_layer_map_in_memory_keeps_the_original_logits(base_folder, tmp_path):
    inputs = random_batch(2, 7)
    base = AutoModelForCausalLM.from_pretrained(base_folder, device_map=per_module_map())
    expected = outputs(base, *inputs).logits
    otter = make_otter(base)
    inserted = outputs(otter, *inputs)
    assert torch.equal(inserted.logits, expected)

    assert torch.equal(inserted.value, outputs(make_otter(make_base(NAME)), *inputs).value)

    otter.save_pretrained(tmp_path / "otter")
    device_map = {**per_module_map(), "v_head": "cpu"}
    mapped = outputs(AutoModelForCausalLM.from_pretrained(tmp_path / "otter", device_map=device_map), *inputs)
    plain = outputs(AutoModelForCausalLM.from_pretrained(tmp_path / "otter"), *inputs)
    assert torch.equal(mapped.logits, expected)
    assert torch.equal(mapped.value, plain.value)


def test_inserted_parameters_follow_the_device_of_their_base_layer():
    base = make_base(NAME)
    names = [name for name, _ in make_otter(base).otter_named_parameters()]
    base.model.layers[1].to("meta")  # a second device: the placement reads where each base module is
    placement = InsertedPlacement(base)
    devices = {name: placement.device_for(name).type for name in names}
    on_layer_1 = {name for name in names if name.startswith("model.layers.1.")}
    assert on_layer_1 and any(".inserted_attn." in name for name in on_layer_1)
    assert {devices[name] for name in on_layer_1} == {"meta"}
    assert {devices[name] for name in names if name not in on_layer_1} == {"cpu"}

    base.lm_head.to("meta")  # the inserted heads read the final streams beside the LM head
    assert InsertedPlacement(base).device_for("v_head.summary.weight").type == "meta"
    assert InsertedPlacement(base).device_for("model.norm.inserted_weight").type == "cpu"


@pytest.mark.parametrize("offload", ["disk", "cpu_offload", "meta"])
def test_insert_refuses_a_base_with_offloaded_weights(base_folder, tmp_path, offload):
    if offload == "disk":
        base = AutoModelForCausalLM.from_pretrained(
            base_folder, device_map=per_module_map(model_layers_1="disk"), offload_folder=tmp_path / "offload"
        )
        where = "model.layers.1"
    elif offload == "cpu_offload":  # accelerate keeps the weights in CPU memory and loads them per forward
        base = cpu_offload(make_base(NAME), execution_device=torch.device("cpu"))
        where = "model.embed_tokens"
    else:
        config_class, model_class, sizes = BASE_MODELS[NAME]
        with init_empty_weights():
            base = model_class(config_class(**sizes))
        where = "model.embed_tokens"
    with pytest.raises(ValueError, match=rf"Cannot insert .* the weights of .*{where}.* are not in memory"):
        otter_hf.insert(base)


def test_load_otter_refuses_a_base_loaded_with_offloading(base_folder, tmp_path):
    make_otter(make_base(NAME)).save_otter(tmp_path / "inserted")
    with pytest.raises(ValueError, match="Cannot attach .* model.layers.1 are not in memory"):
        otter_hf.load_otter(
            base_folder,
            tmp_path / "inserted",
            device_map=per_module_map(model_layers_1="disk"),
            offload_folder=tmp_path / "offload",
        )


def test_loading_an_otter_checkpoint_with_offloading_is_refused(tmp_path):
    make_otter(make_base(NAME)).save_pretrained(tmp_path / "otter")
    options = dict(device_map="auto", max_memory={"cpu": "40KB"}, offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match="Cannot load .* with this `device_map`: the weights of .* are not in memory"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "otter", **options)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_base_split_over_two_gpus_keeps_its_logits_and_places_each_inserted_parameter_with_its_layer(base_folder):
    device_map = per_module_map(model_embed_tokens=0, model_layers_0=0, model_layers_1=1, model_layers_2=1)
    device_map.update({"model.norm": 1, "lm_head": 1, "model.rotary_emb": 0})
    base = AutoModelForCausalLM.from_pretrained(base_folder, device_map=device_map)
    input_ids, attention_mask = (tensor.cuda(0) for tensor in random_batch(2, 7))
    expected = outputs(base, input_ids, attention_mask).logits
    otter = make_otter(base)
    assert torch.equal(outputs(otter, input_ids, attention_mask).logits, expected)
    for name, parameter in otter.otter_named_parameters():
        block = next((module for module in device_map if name.startswith(f"{module}.")), "lm_head")
        assert parameter.device == torch.device("cuda", device_map[block]), name
