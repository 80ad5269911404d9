"""The inserted layer's maths lives in one file, `otter_hf/modeling/inserted_layer.py`, which transformers runs and
the vLLM plugin loads: the plugin's own modules hold only what is vLLM's (its attention, cache, linear layers and
weight loading). These tests read the plugin's source, so they run without vLLM installed."""

import ast
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
    loader = (PLUGIN / "inserted_layer.py").read_text()
    assert '"modeling", "inserted_layer.py"' in loader
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
