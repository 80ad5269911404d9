"""The reach sweep (benchmarks/architecture_reach.py) on a handful of causal-LM types: a registered family, derived
layouts, and refusals by the kind the sweep counts."""

import pytest
from architecture_reach import summary, sweep_type

# model_type -> (status, reason): what the sweep finds on transformers' own tiny random models of these types.
EXPECTED = {
    "llama": ("exact", None),
    "arcee": ("exact", None),
    "gemma2": ("exact", None),
    "cohere": ("refused", "layers.N.post_attention_layernorm"),
    "helium": ("refused", "layers.N.self_attn query head 0"),
    "gpt_neox": ("refused", "embed_tokens"),
}


@pytest.mark.slow
def test_the_sweep_finds_exact_derived_and_refused_types():
    results = {model_type: sweep_type(model_type) for model_type in EXPECTED}
    found = {name: (result["status"], result.get("reason")) for name, result in results.items()}
    assert found == EXPECTED, results
    counts = summary(results)
    assert (counts["built"], counts["exact"], counts["exact_registered"], counts["exact_derived"]) == (6, 3, 1, 2)
    assert counts["refused"] == {reason: 1 for status, reason in EXPECTED.values() if status == "refused"}
    assert counts["sequence_classification"] == 5  # all but cohere
