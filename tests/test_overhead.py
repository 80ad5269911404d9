"""What `otter-hf bench` measures with: the same-size base and the resident-memory readings."""

import pytest
import torch

import otter_hf
from otter_hf.memory import peak_resident_bytes, reset_peak_resident_bytes, resident_bytes
from otter_hf.modeling import is_inserted_parameter
from otter_hf.overhead import same_size_base
from tests.helpers import make_base, random_batch


def test_the_same_size_base_grows_each_layer_by_what_otter_inserts_into_it(base_name):
    base = make_base(base_name)
    otter = otter_hf.insert(base)
    if otter.base_model.otter_layout.sparse_mlp is not None:
        with pytest.raises(ValueError, match="mixture of experts"):
            same_size_base(base, otter)
        return
    grown = same_size_base(base, otter)
    inserted_in_layers = sum(
        parameter.numel()
        for name, parameter in otter.named_parameters()
        if is_inserted_parameter(name) and any(part.isdigit() for part in name.split("."))
    )
    # Whole feed-forward units make up the count: it can miss by less than one unit per layer.
    config = base.config
    unit = 3 * config.hidden_size + 1  # the widest unit: a gated MLP's three weights (and a bias)
    assert abs(grown.num_parameters() - base.num_parameters() - inserted_in_layers) <= config.num_hidden_layers * unit
    assert type(grown) is type(base)
    grown_state = grown.state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(grown_state[name][tuple(slice(0, size) for size in tensor.shape)], tensor), name
    input_ids, attention_mask = random_batch(2, 9, padding="left")
    with torch.no_grad():
        logits = grown(input_ids, attention_mask=attention_mask).logits
    assert logits.shape == (2, 9, config.vocab_size) and torch.isfinite(logits).all()


def test_the_peak_resident_size_rises_with_an_allocation_and_falls_when_reset():
    block_bytes = 64 * 2**20
    before = resident_bytes()
    block = b"\x01" * block_bytes  # written, so its pages are resident
    assert peak_resident_bytes() >= before + 0.9 * block_bytes
    del block
    reset_peak_resident_bytes()
    assert peak_resident_bytes() < before + 0.5 * block_bytes
