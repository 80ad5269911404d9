"""A checkpoint folder never reaches outside itself, and loads read one whole save, whoever writes at the same time."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import otter_hf
from otter_hf.modeling.persistence import OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME, SCRATCH_PREFIX
from tests.helpers import REPOSITORY, make_base, make_otter


@pytest.fixture(scope="module")
def small_and_wide():
    """Two models of one base whose files do not load as each other's: other sizes, other weights."""
    base = make_base("llama-gqa-tied")
    return make_otter(base, seed=1), make_otter(base, seed=2, inserted_hidden_size=24, inserted_intermediate_size=40)


@pytest.fixture
def outside(tmp_path):
    """A folder of the user's beside the checkpoint, with a file a crafted checkpoint would like to take."""
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "id_ed25519").write_text("secret key")
    return folder


def crafted_scratch(checkpoint, journal: list[str] | None = None):
    scratch = checkpoint / f"{SCRATCH_PREFIX}crafted"
    (scratch / "new").mkdir(parents=True)
    (scratch / "previous").mkdir()
    (scratch / "lock").touch()
    if journal is not None:
        (scratch / "journal.json").write_text(json.dumps({"move_in": journal}))
    return scratch


def assert_refused_and_untouched(checkpoint, outside, scratch):
    before = sorted(os.listdir(checkpoint)), sorted(os.listdir(outside))
    for load in (
        AutoModelForCausalLM.from_pretrained,
        lambda folder: otter_hf.load_otter(make_base("llama-gqa-tied"), folder),
    ):
        with pytest.raises(ValueError, match=f"{scratch.name}.*will not follow it.*rm -r"):
            load(checkpoint)
    assert (sorted(os.listdir(checkpoint)), sorted(os.listdir(outside))) == before
    assert (outside / "id_ed25519").read_text() == "secret key"


@pytest.mark.parametrize(
    "journal", [["../home/id_ed25519", "config.json"], ["/etc/passwd"], ["sub\\..\\x", "config.json"], [".."], []]
)
def test_a_journal_naming_anything_but_plain_file_names_is_refused(small_and_wide, tmp_path, outside, journal):
    checkpoint = tmp_path / "checkpoint"
    small_and_wide[0].save_pretrained(checkpoint)
    scratch = crafted_scratch(checkpoint, journal)
    (scratch / "new" / "config.json").write_text("{}")  # so a roll-back would run
    assert_refused_and_untouched(checkpoint, outside, scratch)


@pytest.mark.parametrize("link", ["previous", "new", "scratch", "entry"])
def test_symbolic_links_in_a_scratch_folder_are_refused(small_and_wide, tmp_path, outside, link):
    checkpoint = tmp_path / "checkpoint"
    small_and_wide[0].save_pretrained(checkpoint)
    if link == "scratch":  # the scratch folder itself lies outside, e.g. in the user's home
        scratch = checkpoint / f"{SCRATCH_PREFIX}link"
        os.symlink(crafted_scratch(outside, ["config.json"]), scratch)
    else:
        scratch = crafted_scratch(checkpoint, ["config.json"])
    if link in ("previous", "new"):  # a roll-back would empty `outside` into the checkpoint, or move files into it
        os.rmdir(scratch / link)
        os.symlink(outside, scratch / link)
    else:
        (scratch / "new" / "config.json").write_text("{}")  # not moved in yet: a roll-back would run
    if link == "entry":  # moved back into the checkpoint, a later push would upload what it points to
        os.symlink(outside / "id_ed25519", scratch / "previous" / "tokenizer.json")
    assert_refused_and_untouched(checkpoint, outside, scratch)


def move_out_and_link(checkpoint, name, destination):
    """Replace `checkpoint/name` by a link to the same file moved to `destination`."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(checkpoint / name, destination)
    os.symlink(destination, checkpoint / name)


@pytest.mark.parametrize("entry", ["model.safetensors", "config.json", OTTER_WEIGHTS_NAME, "subfolder"])
def test_links_leading_out_of_a_checkpoint_are_refused(small_and_wide, tmp_path, outside, entry):
    """Each linked file holds what the save wrote, so only the link itself can make the load fail."""
    checkpoint = tmp_path / "checkpoint"
    if entry == OTTER_WEIGHTS_NAME:
        small_and_wide[0].save_otter(checkpoint)
        load = lambda: otter_hf.load_otter(make_base("llama-gqa-tied"), checkpoint)  # noqa: E731
    elif entry == "subfolder":
        small_and_wide[0].save_pretrained(outside / "model")
        checkpoint.mkdir()
        os.symlink(outside / "model", checkpoint / "model")
        load = lambda: AutoModelForCausalLM.from_pretrained(checkpoint, subfolder="model")  # noqa: E731
    else:
        small_and_wide[0].save_pretrained(checkpoint)
        load = lambda: AutoModelForCausalLM.from_pretrained(checkpoint)  # noqa: E731
    if entry != "subfolder":
        move_out_and_link(checkpoint, entry, outside / entry)
    with pytest.raises(ValueError, match=f"leads out of the checkpoint folder.*{outside}.*cp --remove-destination"):
        load()


def test_links_within_a_checkpoint_and_into_a_hub_cache_are_followed(small_and_wide, tmp_path):
    model = small_and_wide[0]
    inside = tmp_path / "inside"
    model.save_pretrained(inside)
    move_out_and_link(inside, "model.safetensors", inside / "weights" / "model.safetensors")
    # huggingface_hub's cache: snapshots/<revision>/<file> -> ../../blobs/<hash>
    snapshot = tmp_path / "hub" / "models--user--otter" / "snapshots" / "abc123"
    model.save_pretrained(snapshot)
    for name in os.listdir(snapshot):
        blob = snapshot.parents[1] / "blobs" / f"hash-of-{name}"
        blob.parent.mkdir(exist_ok=True)
        os.replace(snapshot / name, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    for folder in (inside, snapshot):
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in loaded.state_dict().items())


def test_a_save_into_a_folder_with_a_crafted_scratch_folder_refuses_too(small_and_wide, tmp_path, outside):
    checkpoint = tmp_path / "checkpoint"
    small_and_wide[0].save_pretrained(checkpoint)
    crafted_scratch(checkpoint, ["../home/id_ed25519"])
    with pytest.raises(ValueError, match="not a plain file name"):
        small_and_wide[1].save_pretrained(checkpoint)
    assert (outside / "id_ed25519").read_text() == "secret key"
    assert json.loads((checkpoint / "config.json").read_text())["inserted_hidden_size"] == 16


def test_a_config_read_before_a_save_is_read_again_with_the_weights(small_and_wide, tmp_path):
    """AutoModel reads config.json before the Otter class takes the folder's lock; a save in between must not
    give the previous config with the new weights."""
    small, wide = small_and_wide
    small.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    wide.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, config=config)
    assert loaded.config.inserted_hidden_size == wide.config.inserted_hidden_size
    assert torch.equal(loaded.get_input_embeddings().inserted_weight, wide.get_input_embeddings().inserted_weight)


# Each child saves one of the two models over and over (`save`), loads and checks what it got (`load`), or saves
# and kills itself mid-commit at a random move (`kill`); the parent checks the folder loads whole at the end.
CHILD = r"""
import os, random, signal, sys
sys.path.insert(0, sys.argv[3])
import torch
from transformers import AutoModelForCausalLM
from tests.helpers import make_base, make_otter
from otter_hf.modeling import persistence

role, folder, seed = sys.argv[1], sys.argv[2], int(sys.argv[4])
base = make_base("llama-gqa-tied")
wide = make_otter(base, seed=2, inserted_hidden_size=24, inserted_intermediate_size=40)
models = {16: make_otter(base, seed=1), 24: wide}
expected = {size: model.get_input_embeddings().inserted_weight for size, model in models.items()}
random.seed(seed)
if role == "kill":
    replace, moves, kill_at = os.replace, [], random.randrange(1, 6)
    def replace_then_die(source, destination):
        replace(source, destination)
        moves.append(destination)
        if len(moves) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    persistence.os.replace = replace_then_die
for _ in range(int(sys.argv[5])):
    size = random.choice(sorted(models))
    if role in ("save", "kill"):
        models[size].save_pretrained(folder)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        size = loaded.config.inserted_hidden_size
        assert torch.equal(loaded.get_input_embeddings().inserted_weight, expected[size]), "a mix of two saves"
"""


def run_children(folder, roles: list[tuple[str, int]]):
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, role, str(folder), REPOSITORY, str(seed), str(repeats)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed, (role, repeats) in enumerate(roles)
    ]
    return [(child.wait(timeout=600), child.stderr.read().decode()) for child in children]


def test_loads_during_saves_and_kills_read_one_whole_save(small_and_wide, tmp_path):
    small_and_wide[0].save_pretrained(tmp_path)
    roles = [("save", 8), ("load", 8), ("kill", 1), ("kill", 1)]
    results = run_children(tmp_path, roles)
    for (status, stderr), (role, _) in zip(results, roles):
        assert status == (-9 if role == "kill" else 0), stderr[-3000:]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    expected = dict(zip((16, 24), small_and_wide))[loaded.config.inserted_hidden_size]
    assert torch.equal(loaded.get_input_embeddings().inserted_weight, expected.get_input_embeddings().inserted_weight)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(SCRATCH_PREFIX)]


# -- verified loads and saves --------------------------------------------------------------------------------


def poison(model):
    with torch.no_grad():
        next(model.otter_parameters())[0] = float("nan")


def test_saves_refuse_non_finite_inserted_weights(tmp_path):
    model = make_otter(make_base("llama-gqa-tied"))
    poison(model)
    for save in (model.save_pretrained, model.save_otter):
        with pytest.raises(ValueError, match="Refusing to save.*NaN or infinite.*lower learning rate"):
            save(tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_load_otter_requires_the_base_fingerprint_unless_told_to_skip_it(tmp_path):
    base = make_base("llama-gqa-tied")
    make_otter(base).save_otter(tmp_path)
    saved = json.loads((tmp_path / OTTER_CONFIG_NAME).read_text())
    del saved["base_model_fingerprint"]
    (tmp_path / OTTER_CONFIG_NAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="no `base_model_fingerprint`.*skip_base_fingerprint_check=True"):
        otter_hf.load_otter(base, tmp_path)
    other_base = make_base("llama-gqa-tied", seed=5)
    assert (
        otter_hf.load_otter(other_base, tmp_path, skip_base_fingerprint_check=True).config.base_model_fingerprint
        is None
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda tensors, name: tensors.pop(name), "missing model.embed_tokens.inserted_weight"),
        (
            lambda tensors, name: tensors.update(extra_inserted_weight=torch.zeros(2)),
            "unexpected extra_inserted_weight",
        ),
        (
            lambda tensors, name: tensors.update({name: tensors[name][:, :3].contiguous()}),
            r"shapes differ.*embed_tokens.inserted_weight \(96, 3\) vs \(96, 16\)",
        ),
        (
            lambda tensors, name: tensors.update({name: tensors[name].to(torch.int32)}),
            "dtypes cannot be cast.*torch.int32",
        ),
        (
            lambda tensors, name: tensors[name].fill_(float("inf")),
            "Refusing to load.*model.embed_tokens.inserted_weight",
        ),
    ],
    ids=["missing", "unexpected", "shape", "dtype", "non-finite"],
)
def test_load_otter_names_inserted_tensors_that_do_not_fit(tmp_path, damage, message):
    base = make_base("llama-gqa-tied")
    make_otter(base).save_otter(tmp_path)
    tensors = load_file(tmp_path / OTTER_WEIGHTS_NAME)
    damage(tensors, "model.embed_tokens.inserted_weight")
    save_file(tensors, tmp_path / OTTER_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=message):
        otter_hf.load_otter(base, tmp_path)


@pytest.mark.parametrize("damage", ["missing", "non-finite"])
def test_from_pretrained_refuses_missing_or_non_finite_inserted_tensors(tmp_path, damage):
    make_otter(make_base("llama-gqa-tied")).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    if damage == "missing":
        del tensors["v_head.summary.weight"], tensors["model.layers.1.inserted_mlp.down_proj.weight"]
        message = "missing model.layers.1.inserted_mlp.down_proj.weight, v_head.summary.weight"
    else:
        tensors["v_head.summary.weight"] = torch.full_like(tensors["v_head.summary.weight"], float("nan"))
        message = "Refusing to load.*v_head.summary.weight"
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)
