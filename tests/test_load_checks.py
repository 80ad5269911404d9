"""Every load of an Otter checkpoint runs one verification (`otter_hf.modeling.verification`): `from_pretrained`, the
sequence-classification view and `load_otter` refuse the same bad files, dtypes included, and a crafted config is
refused from the safetensors header, before the model it names is built."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import otter_hf
from tests.helpers import make_base, make_otter

INSERTED = "model.layers.0.inserted_mlp.down_proj.weight"


@pytest.fixture
def saved(tmp_path):
    base = make_base("llama-gqa-tied")
    make_otter(base).save_pretrained(tmp_path / "full")
    make_otter(base).save_otter(tmp_path / "inserted")
    return tmp_path, base


def edit_weights(path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as file:
        config = json.load(file)
    config.update(changes)
    with open(path, "w") as file:
        json.dump(config, file)


LOADERS = {
    "from_pretrained": lambda folder: AutoModelForCausalLM.from_pretrained(folder),
    "sequence-classification": lambda folder: AutoModelForSequenceClassification.from_pretrained(folder),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_an_inserted_tensor_stored_as_integers_or_bools_is_refused_on_every_load_path(saved, loader, dtype):
    tmp_path, base = saved
    for path in (tmp_path / "full" / "model.safetensors", tmp_path / "inserted" / "otter_model.safetensors"):
        edit_weights(path, lambda t: t.update({INSERTED: t[INSERTED].to(dtype)}))
    message = rf"saved dtypes cannot be cast to the model's for .*down_proj.weight {dtype} vs torch.float32"
    with pytest.raises(ValueError, match=message):
        LOADERS[loader](tmp_path / "full")
    with pytest.raises(ValueError, match=message):
        otter_hf.load_otter(base, tmp_path / "inserted")


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_shape_or_a_missing_tensor_is_refused_before_the_model_is_built(saved, loader, monkeypatch):
    tmp_path, _ = saved
    built = []
    monkeypatch.setattr(otter_hf.OtterLlamaForCausalLMWithValueHead, "_from_config", built.append)
    edit_config(tmp_path / "full", num_draft_heads=3)
    with pytest.raises(ValueError, match=r"full do not fit this model: missing draft_heads\.layers\.0\.bias"):
        LOADERS[loader](tmp_path / "full")
    edit_config(tmp_path / "full", num_draft_heads=0, vocab_size=100_000_000)
    with pytest.raises(
        ValueError, match=r"shapes differ .* for model.embed_tokens.inserted_weight \(96, 16\) vs \(100000000, 16\)"
    ):
        LOADERS[loader](tmp_path / "full")
    assert not built


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_draft_heads=1_000_000), r"`num_draft_heads` must be an integer from 0 to 64"),
        (dict(num_recurrent_drafts=100_000), r"`num_recurrent_drafts` must be an integer from 0 to 64"),
        (dict(inserted_init="normal", inserted_hidden_size=1_000_000), r"`inserted_hidden_size` is 1000000, above"),
        (dict(inserted_num_attention_heads=10**6, inserted_num_key_value_heads=1), r"above its bound 1024"),
        (dict(num_hidden_layers=10**6), r"`num_hidden_layers` must be an integer from 1 to 1024"),
    ],
    ids=["draft-heads", "recurrent-drafts", "hidden-size", "heads", "layers"],
)
def test_a_config_count_beyond_its_bound_is_refused(saved, changes, message):
    tmp_path, _ = saved
    edit_config(tmp_path / "full", **changes)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "full")


def test_loading_a_crafted_few_kb_folder_stays_under_100_mb_above_the_base(saved):
    """A config naming a huge model beside a few KB of weights is refused before anything it names is allocated:
    peak memory, measured in a fresh process, grows by under 100 MB (it grew by GBs when transformers built first)."""
    tmp_path, _ = saved
    folder = tmp_path / "crafted"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, folder / "model.safetensors")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    config.update(vocab_size=50_000_000, intermediate_size=10_000_000, inserted_init="normal")
    (folder / "config.json").write_text(json.dumps(config))
    assert sum(path.stat().st_size for path in folder.iterdir()) < 8192
    code = (
        "import resource, sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "import otter_hf\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        "except ValueError as error:\n"
        "    print('REFUSED', str(error)[:200])\n"
        "print('GROWTH_MB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED" in result.stdout, result.stdout
    growth = float(result.stdout.split("GROWTH_MB")[1])
    assert growth < 100, result.stdout


def test_a_folder_holding_only_pickled_weights_is_refused(saved):
    tmp_path, _ = saved
    folder = tmp_path / "full"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"a pickle would run code here")
    with pytest.raises(ValueError, match=r"pickle \(pytorch_model.bin\) and no model.safetensors: otter_hf loads"):
        AutoModelForCausalLM.from_pretrained(folder)
