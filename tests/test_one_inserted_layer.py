"""The inserted layer's maths lives in one file, `otter_hf/modeling/inserted_layer.py`, which transformers runs and
the vLLM plugin loads: the plugin's own modules hold only what is vLLM's (its attention, cache, linear layers and
weight loading). These tests read the plugin's source, so they run without vLLM installed."""

import ast
import inspect
from pathlib import Path

import otter_hf_vllm

PLUGIN = Path(otter_hf_vllm.__file__).parent
# Operations that only the inserted layer's maths uses: the norm statistics, the rotation, the gated activation.
MATHS_CALLS = {"vector_norm", "rsqrt", "rsqrt_", "var_mean", "roll", "addcmul", "silu"}


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            function = node.func
            names.add(function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", ""))
    return names


def test_the_vllm_plugin_writes_none_of_the_inserted_layers_maths():
    for path in sorted(PLUGIN.glob("*.py")):
        assert not (_calls(path) & MATHS_CALLS), f"{path.name} computes {_calls(path) & MATHS_CALLS} itself"


def test_the_vllm_plugin_runs_otter_hfs_inserted_modules():
    import otter_hf.modeling.inserted_layer
    from otter_hf_vllm import inserted_layer as plugin_inserted_layer

    # The very file, loaded on its own (not the otter_hf package's module object).
    for name in ("OtterInsertedAttention", "OtterInsertedMLP", "InsertedRMSNorm", "inserted_layer"):
        loaded = getattr(plugin_inserted_layer, name)
        assert loaded is not getattr(otter_hf.modeling.inserted_layer, name)
        assert inspect.getfile(loaded) == otter_hf.modeling.inserted_layer.__file__
    modeling = ast.parse((PLUGIN / "modeling.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(modeling)
        if isinstance(node, ast.ImportFrom) and node.module == "inserted_layer"
        for alias in node.names
    }
    assert {"OtterInsertedAttention", "OtterInsertedMLP", "InsertedRMSNorm", "inserted_layer"} <= imported
    defined = {node.name for node in modeling.body if isinstance(node, ast.ClassDef)}
    assert not defined & {"OtterInsertedAttention", "OtterInsertedMLP"}


def test_the_vllm_plugin_checks_guidance_weights_with_otter_hfs_check():
    from otter_hf.modeling import guidance_weight
    from otter_hf_vllm.otter_hf_files import load_otter_hf_file

    loaded = load_otter_hf_file("guidance_weight")
    assert inspect.getfile(loaded.check_guidance_weight) == guidance_weight.__file__
    assert loaded.MAX_GUIDANCE_WEIGHT == guidance_weight.MAX_GUIDANCE_WEIGHT
    # The plugin's token reward guidance (it imports vLLM, so it is read here) takes the bound from that file.
    source = (PLUGIN / "token_reward_guidance.py").read_text()
    assert 'load_otter_hf_file("guidance_weight")' in source
    assert not _calls(PLUGIN / "token_reward_guidance.py") & {"finfo", "isinstance"}
