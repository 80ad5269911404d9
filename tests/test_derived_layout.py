"""`otter_hf.insert` on an unregistered Llama-like base: the layout derived from its module names, used once a probe
forward shows it fits, and refused otherwise, naming where it does not (otter_hf/modeling/derived_layout.py,
otter_hf/lifecycle/layout_probe.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.arcee import modeling_arcee

import otter_hf
from otter_hf.modeling import OTTER_CLASSES_BY_BASE_MODEL_TYPE
from tests.helpers import COMMON, random_batch
from tests.test_remote_code import LOAD_WITHOUT_OTTER_HF

TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16
)
# Unregistered families the derived layout covers, each with a feature of its own: Llama's layout with an MLP without
# a gate (Arcee), norms on the modules' outputs and q/k norms per head (EXAONE 4), Gemma's norm, sandwich norms and
# softcapping (Gemma 2).
DERIVED = {
    "arcee": "InsertedRMSNorm pre-norms, rotary, MLP without a gate",
    "exaone4": "norms on the modules' outputs, rotary, q/k norms per head",
    "gemma2": "InsertedGemmaRMSNorm sandwich norms",
}


def tiny_base(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **TINY, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def insert_derived(base, **options):
    with pytest.warns(UserWarning, match="layout is derived from the base's module names") as warned:
        otter = otter_hf.insert(base, **options)
    return otter, str(warned[0].message)


@pytest.mark.parametrize("model_type", sorted(DERIVED))
def test_a_derived_layout_keeps_the_original_output_and_trains(model_type, tmp_path):
    assert model_type not in OTTER_CLASSES_BY_BASE_MODEL_TYPE
    base = tiny_base(model_type)
    otter, warning = insert_derived(base, inserted_hidden_size=16, inserted_num_attention_heads=2)
    assert type(otter).__name__ == f"Otter{type(base).__name__}WithValueHead"
    assert type(otter).__name__ in warning and DERIVED[model_type] in warning
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        expected = base(input_ids, attention_mask=attention_mask).logits
        output = otter(input_ids, attention_mask=attention_mask)
    assert torch.equal(output.logits, expected)
    assert output.value.shape == input_ids.shape
    output = otter(input_ids, attention_mask=attention_mask)
    output.value.sum().backward()
    assert all(parameter.grad is not None for parameter in otter.otter_parameters() if parameter.requires_grad)
    assert all(parameter.grad is None for parameter in base.parameters())

    otter.save_pretrained(tmp_path / "full")
    otter.save_otter(tmp_path / "inserted")
    for reloaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "full"),
        otter_hf.load_otter(base, tmp_path / "inserted"),
    ):
        assert type(reloaded) is type(otter)
        with torch.no_grad():
            again = reloaded.eval()(input_ids, attention_mask=attention_mask)
            first = otter.eval()(input_ids, attention_mask=attention_mask)
        assert torch.equal(again.logits, expected)
        torch.testing.assert_close(again.value, first.value, atol=1e-5, rtol=1e-5)


def test_a_derived_mixture_of_experts_reads_its_sparse_blocks():
    base = tiny_base("flex_olmo", num_experts=4, num_experts_per_tok=2)
    otter, warning = insert_derived(base)
    assert "sparse FlexOlmoSparseMoeBlock" in warning
    input_ids, _ = random_batch(2, 5)
    with torch.no_grad():
        assert torch.equal(otter(input_ids).logits, base(input_ids).logits)


def test_a_derived_checkpoint_loads_as_remote_code_without_otter_hf(tmp_path):
    otter, _ = insert_derived(tiny_base("arcee"))
    otter.save_pretrained(tmp_path / "saved")
    auto_map = json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "derived_layout.OtterArceeForCausalLMWithValueHead"
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        output = otter(input_ids, attention_mask=attention_mask)
    expected = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "logits": output.logits,
        "value": output.value,
    }
    save_file(expected, str(tmp_path / "expected.safetensors"))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_OTTER_HF,
            json.dumps({str(tmp_path / "saved"): str(tmp_path / "expected.safetensors")}),
            str(tmp_path / "report.json"),
        ],
        env=environment,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report.pop("otter_hf_imported") is False
    result = report[str(tmp_path / "saved")]
    assert result["causal_lm_class"].endswith("derived_layout.OtterArceeForCausalLMWithValueHead")
    assert result["logits_equal"] and result["value_close"] and result["only_inserted_trainable"]
    assert result["sequence_classifier_class"] == "OtterArceeForSequenceClassification"


def test_a_base_without_a_capture_point_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"'cohere'.*`layers\.0\.post_attention_layernorm`.*otter_hf/modeling/README"):
        otter_hf.insert(tiny_base("cohere"))


def test_a_capture_point_that_does_not_fire_is_refused_naming_it(monkeypatch):
    # A base computing its down projection without calling the module: the same output, a capture point never fired.
    def mlp_without_down_proj_call(self, states):
        units = self.act_fn(self.up_proj(states))
        return torch.nn.functional.linear(units, self.down_proj.weight, self.down_proj.bias)

    monkeypatch.setattr(modeling_arcee.ArceeMLP, "forward", mlp_without_down_proj_call)
    with pytest.raises(ValueError, match=r"`layers\.0\.mlp\.down_proj`: this capture point did not fire"):
        otter_hf.insert(tiny_base("arcee"))


def test_a_base_whose_output_the_probe_does_not_reproduce_is_refused():
    # A module of this base object changed after it was built: the derived classes build the family's own module.
    base = tiny_base("arcee")
    base.model.layers[1].mlp.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match=r"`logits`: the original logits on the probe forward differ"):
        otter_hf.insert(base)


def test_a_rotation_the_inserted_heads_do_not_repeat_is_refused():
    # Helium rotates interleaved channel pairs, where the derived layout rotates half against half: its own output is
    # intact and every capture point fires, only the inserted heads would be wrong, so the probe refuses it.
    with pytest.raises(ValueError, match=r"'helium'.*`layers\.0\.self_attn query head 0`: the copy-initialised"):
        otter_hf.insert(tiny_base("helium"))


def test_a_derived_checkpoint_loads_in_a_fresh_process_with_otter_hf(tmp_path):
    # Nothing registers `otter_arcee` in a fresh process until otter_hf reads the checkpoint's model_type.
    otter, _ = insert_derived(tiny_base("arcee"))
    otter.save_pretrained(tmp_path / "saved")
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        expected = otter(input_ids, attention_mask=attention_mask)
    save_file({"input_ids": input_ids, "attention_mask": attention_mask, "logits": expected.logits}, tmp_path / "x")
    script = (
        "import sys, torch; from safetensors.torch import load_file\n"
        "from otter_hf.lifecycle.loading import load_model\n"
        "from otter_hf.modeling import sequence_classification_view\n"
        "model = load_model(sys.argv[1], otter_only=False).eval(); tensors = load_file(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    logits = model(tensors['input_ids'], attention_mask=tensors['attention_mask']).logits\n"
        "assert torch.equal(logits, tensors['logits']), 'logits differ'\n"
        "print(type(sequence_classification_view(model)).__name__)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "saved"), str(tmp_path / "x")],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "OtterArceeForSequenceClassification"
