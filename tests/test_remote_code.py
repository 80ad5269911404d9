"""Saved Otter checkpoints load with trust_remote_code in a process where otter_hf cannot be imported."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import otter_hf
from otter_hf.lifecycle.hub import push_to_hub
from otter_hf.modeling import sequence_classification_view
from otter_hf.modeling.inserted_stream import inserted_cache_layer_indices
from tests.helpers import ARCHITECTURE_BASES, FakeHub, make_base, make_otter, random_batch

# Runs in a fresh interpreter with otter_hf made unimportable, offline.
LOAD_WITHOUT_OTTER_HF = r"""
import importlib
import importlib.abc
import json
import sys


class BlockOtterHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "otter_hf":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")


sys.meta_path.insert(0, BlockOtterHF())

import torch
from safetensors.torch import load_file
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

GUIDED_DECODING = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
report = {}
for repo, tensors_path in json.loads(sys.argv[1]).items():
    tensors = load_file(tensors_path)
    result = report[repo] = {}
    for auto_class in (AutoConfig, AutoModelForCausalLM):
        try:
            auto_class.from_pretrained(repo)
            result[f"{auto_class.__name__} without trust_remote_code"] = "loaded"
        except ValueError as error:
            result[f"{auto_class.__name__} without trust_remote_code"] = str(error)
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
    with torch.no_grad():
        output = model(tensors["input_ids"], attention_mask=tensors["attention_mask"])
    real = tensors["attention_mask"].bool()
    if "guided_ids" in tensors:
        guided = model.generate(
            tensors["input_ids"], attention_mask=tensors["attention_mask"], token_reward_weight=2.0, **GUIDED_DECODING
        )
        result["guided_equal"] = torch.equal(guided, tensors["guided_ids"])
    if "args_guided_ids" in tensors:
        args_guided = model.generate(
            tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            reward_weight=2.0,
            reward_top_k=3,
            **GUIDED_DECODING,
        )
        result["args_guided_equal"] = torch.equal(args_guided, tensors["args_guided_ids"])
    if "expert_ids" in tensors:
        steered = model.generate(
            tensors["input_ids"], attention_mask=tensors["attention_mask"], expert_weight=2.0, **GUIDED_DECODING
        )
        result["expert_equal"] = torch.equal(steered, tensors["expert_ids"])
    result["causal_lm_class"] = f"{type(model).__module__}.{type(model).__name__}"
    result["logits_equal"] = torch.equal(output.logits, tensors["logits"])
    result["value_close"] = torch.allclose(output.value[real], tensors["value"][real], atol=1e-5, rtol=1e-5)
    modeling_otter = importlib.import_module(type(model).__module__.rpartition(".")[0] + ".modeling_otter")
    result["only_inserted_trainable"] = all(
        parameter.requires_grad == modeling_otter.is_inserted_parameter(name)
        for name, parameter in model.named_parameters()
    ) and model.v_head.summary.weight.requires_grad
    result["config_class"] = type(AutoConfig.from_pretrained(repo, trust_remote_code=True)).__name__
    result["backbone_class"] = type(AutoModel.from_pretrained(repo, trust_remote_code=True)).__name__
    classifier = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True).eval()
    with torch.no_grad():
        scores = classifier(tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
    result["sequence_classifier_class"] = type(classifier).__name__
    result["sequence_scores_shape"] = list(scores.shape)
report["otter_hf_imported"] = any(name.partition(".")[0] == "otter_hf" for name in sys.modules)
report["transformers_version"] = transformers.__version__
with open(sys.argv[2], "w") as file:  # not stdout: transformers' trust_remote_code prompt writes there
    json.dump(report, file)
"""


def has_no_linear_attention(config) -> bool:
    return len(inserted_cache_layer_indices(config)) == config.num_hidden_layers


def expected_outputs(model, path) -> None:
    """Save what a reload of `model` must give at `path`: its outputs on a batch, and its guided generations."""
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask)
    expected = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "logits": output.logits,
        "value": output.value,
    }
    if model.config.token_reward_head:
        # Token-reward guidance runs in the checkpoint's own code, without otter_hf.
        expected["guided_ids"] = model.generate(
            input_ids,
            attention_mask=attention_mask,
            token_reward_weight=2.0,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )
    if model.config.token_reward_head and has_no_linear_attention(model.config):
        # ARGS guidance too: its decoding loop ships with the checkpoint's code (refused where linear attention is).
        expected["args_guided_ids"] = model.generate(
            input_ids,
            attention_mask=attention_mask,
            reward_weight=2.0,
            reward_top_k=3,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )
    if model.config.expert_heads:
        # DExperts-style steering too: the expert heads and their processor ship with the checkpoint's code.
        expected["expert_ids"] = model.generate(
            input_ids,
            attention_mask=attention_mask,
            expert_weight=2.0,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )
    save_file(expected, str(path))


def load_without_otter_hf(repos: dict[str, str], tmp_path, hub_cache_dir: str | None = None) -> dict:
    """Load each checkpoint of `repos` (folder or repository id -> its `expected_outputs` file) with
    trust_remote_code in a fresh interpreter where otter_hf cannot be imported, offline; its report."""
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": hub_cache_dir or str(tmp_path / "hub"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": "",
    }
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_OTTER_HF, json.dumps(repos), str(tmp_path / "report.json")],
        env=environment,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,  # transformers asks on a terminal; without one it refuses
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((tmp_path / "report.json").read_text())


def test_saved_checkpoint_carries_its_code_and_auto_map(tmp_path):
    otter = make_otter(make_base("qwen2-bias"))
    otter.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "otter_qwen2.OtterQwen2Config",
        "AutoModel": "otter_qwen2.OtterQwen2Model",
        "AutoModelForCausalLM": "otter_qwen2.OtterQwen2ForCausalLMWithValueHead",
        "AutoModelForSequenceClassification": "otter_qwen2.OtterQwen2ForSequenceClassification",
    }
    for reference in config["auto_map"].values():
        module, _, class_name = reference.partition(".")
        assert f"class {class_name}(" in (tmp_path / f"{module}.py").read_text()


def test_a_checkpoint_ships_only_its_own_architectures_code(base_name, tmp_path):
    otter = make_otter(make_base(base_name))
    otter.save_pretrained(tmp_path)
    architecture_file = sys.modules[type(otter).__module__].__file__
    shipped = {path.name for path in tmp_path.glob("*.py")}
    # A sibling architecture whose layout this one reuses (OLMo 2 takes OLMo 3's) ships too.
    sibling_architectures = {
        f"{node.module}.py"
        for node in ast.walk(ast.parse(Path(architecture_file).read_text()))
        if isinstance(node, ast.ImportFrom) and node.level == 1 and (node.module or "").startswith("otter_")
    }
    # The latent-attention rules ship with the DeepSeek families.
    latent = {"latent_attention.py"} if otter.config.base_model_type.startswith("deepseek") else set()
    # The architecture's file and what it imports (followed through relative imports, copied flat), nothing else.
    assert shipped == sibling_architectures | latent | {
        os.path.basename(architecture_file),
        "configuration_otter.py",
        "candidates.py",
        "expert_guidance.py",
        "guidance_weight.py",
        "initialization.py",
        "inserted_heads.py",
        "inserted_layer.py",
        "inserted_stream.py",
        "loop_inputs.py",
        "modeling_otter.py",
        "persistence.py",
        "quantization.py",
        "reward_guided.py",
        "sequence_classification.py",
        "token_reward_guidance.py",
        "verification.py",
    }


def test_sequence_classification_checkpoint_maps_every_auto_class(tmp_path):
    view = sequence_classification_view(make_otter(make_base("llama-gqa-tied")))
    view.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "otter_llama.OtterLlamaForCausalLMWithValueHead"
    assert auto_map["AutoModelForSequenceClassification"] == "otter_llama.OtterLlamaForSequenceClassification"


def test_checkpoints_load_with_trust_remote_code_without_otter_hf(tmp_path, monkeypatch):
    hub = FakeHub(str(tmp_path / "hub"))
    repos = {}
    # A local folder per architecture, and one repository pulled from the (fake) Hub.
    for name in (name for name in ARCHITECTURE_BASES if name != "qwen2-bias"):
        otter = make_otter(
            make_base(name), token_reward_head=name == "llama-gqa-tied", expert_heads=name == "gemma3-sliding-softcap"
        )
        folder = tmp_path / f"saved-{name}"
        otter.save_pretrained(folder)
        expected_outputs(otter, tmp_path / f"{name}.safetensors")
        repos[str(folder)] = str(tmp_path / f"{name}.safetensors")
    otter = make_otter(make_base("qwen2-bias"))
    monkeypatch.setattr("otter_hf.lifecycle.hub.HfApi", hub)
    push_to_hub(otter, "user/otter-qwen2")
    expected_outputs(otter, tmp_path / "qwen2.safetensors")
    repos["user/otter-qwen2"] = str(tmp_path / "qwen2.safetensors")

    report = load_without_otter_hf(repos, tmp_path, hub.cache_dir)
    assert report.pop("otter_hf_imported") is False
    assert report.pop("transformers_version") == transformers.__version__
    for repo, result in report.items():
        for auto_class in ("AutoConfig", "AutoModelForCausalLM"):
            refusal = result[f"{auto_class} without trust_remote_code"]
            assert "contains custom code" in refusal and "trust_remote_code=True" in refusal, refusal
        assert result["causal_lm_class"].startswith("transformers_modules.")
        assert result["causal_lm_class"].endswith("ForCausalLMWithValueHead")
        assert result["logits_equal"] and result["value_close"], repo
        # Only the Llama checkpoint has a token-level reward head, which the guided decodings need.
        assert result.get("guided_equal", not repo.endswith("llama-gqa-tied")), repo
        assert result.get("args_guided_equal", not repo.endswith("llama-gqa-tied")), repo
        assert result.get("expert_equal", "gemma3" not in repo), repo
        assert result["only_inserted_trainable"]
        assert result["config_class"].startswith("Otter") and result["config_class"].endswith("Config")
        assert result["backbone_class"].startswith("Otter") and result["backbone_class"].endswith("Model")
        assert result["sequence_classifier_class"].endswith("ForSequenceClassification")
        assert result["sequence_scores_shape"] == [2, 1]


OTTER_OTHER_TRANSFORMERS_PYTHON = os.environ.get("OTTER_OTHER_TRANSFORMERS_PYTHON")


@pytest.mark.skipif(
    not OTTER_OTHER_TRANSFORMERS_PYTHON,
    reason="set OTTER_OTHER_TRANSFORMERS_PYTHON to the python of an environment with another transformers "
    "(.ci/run does)",
)
def test_a_checkpoint_loads_under_another_transformers_version_through_its_remote_code(tmp_path):
    repos = {}
    for name in ARCHITECTURE_BASES:
        otter = make_otter(make_base(name), token_reward_head=name == "llama-gqa-tied")
        otter.save_pretrained(tmp_path / f"saved-{name}")
        expected_outputs(otter, tmp_path / f"{name}.safetensors")
        repos[str(tmp_path / f"saved-{name}")] = str(tmp_path / f"{name}.safetensors")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    completed = subprocess.run(
        [
            OTTER_OTHER_TRANSFORMERS_PYTHON,
            "-c",
            LOAD_WITHOUT_OTTER_HF,
            json.dumps(repos),
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
    assert report.pop("transformers_version") != transformers.__version__
    for repo, result in report.items():
        assert result["logits_equal"] and result["value_close"], repo
        # Only the Llama checkpoint has a token-level reward head, which the guided decodings need.
        assert result.get("guided_equal", not repo.endswith("llama-gqa-tied")), repo
        assert result.get("args_guided_equal", not repo.endswith("llama-gqa-tied")), repo


def test_the_modeling_files_import_nothing_of_otter_hf_outside_them():
    # They ship as a checkpoint's remote code, flat beside it: only sibling imports resolve there.
    modeling = Path(otter_hf.modeling.__file__).parent
    for path in modeling.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), f"{path.name} imports from outside otter_hf/modeling"
                assert node.level == 1 or not (node.module or "").startswith("otter_hf"), path.name
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("otter_hf") for alias in node.names), path.name
