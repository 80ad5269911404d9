"""Replacing a checkpoint on disk: the files of one save change as a unit, whatever interrupts it."""

import functools
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import otter_hf
from otter_hf.modeling import persistence
from otter_hf.modeling.persistence import OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME, SCRATCH_PREFIX
from tests.helpers import REPOSITORY, make_base, make_otter, make_tokenizer


class Interrupted(BaseException):
    """Stands for Ctrl-C (or a kill) at a chosen point of a save."""


@pytest.fixture(scope="module")
def previous_and_new():
    """Two checkpoints of the same base that a mix of their files would not load as: other sizes, other weights."""
    base = make_base("llama-gqa-tied")
    return make_otter(base, seed=1), make_otter(base, seed=2, inserted_hidden_size=24, inserted_intermediate_size=40)


def assert_loads_as(folder, expected):
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.inserted_hidden_size == expected.config.inserted_hidden_size
    saved, reloaded = expected.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[name], reloaded[name]) for name in saved)


def scratch_folders(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(SCRATCH_PREFIX)]


def moves_into_or_out_of(folder, monkeypatch, on_move):
    """Call `on_move(index, source, destination, replace)` for each rename of an entry into or out of `folder`."""
    replace, moves = os.replace, []

    def watched_replace(source, destination):
        if os.path.dirname(os.fspath(destination)) == os.fspath(folder) or os.path.dirname(
            os.fspath(source)
        ) == os.fspath(folder):
            moves.append((source, destination))
            on_move(len(moves) - 1, source, destination, replace)
        else:
            replace(source, destination)

    monkeypatch.setattr(persistence.os, "replace", watched_replace)
    return moves


def interrupt_at(interrupted_at: int, *, after_the_move: bool = False, on_interrupt=None):
    """An `on_move` that interrupts the save at its move number `interrupted_at`: just before that move, or right
    after it with `after_the_move`. `on_interrupt()` runs as the save stops (to copy what a killed process leaves)."""

    def on_move(index, source, destination, replace):
        if index == interrupted_at:
            if after_the_move:
                replace(source, destination)
            if on_interrupt is not None:
                on_interrupt()
            raise Interrupted
        replace(source, destination)

    return on_move


def count_moves(save, folder, monkeypatch) -> int:
    with monkeypatch.context() as patch:
        moves = moves_into_or_out_of(
            folder, patch, lambda index, source, destination, replace: replace(source, destination)
        )
        save()
    return len(moves)


def prepare_previous(folder, previous):
    previous.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    (folder / "all_results.json").write_text("{}")


def test_save_pretrained_replaces_its_files_and_leaves_the_others(previous_and_new, tmp_path):
    previous, new = previous_and_new
    prepare_previous(tmp_path, previous)
    new.save_pretrained(tmp_path)
    assert_loads_as(tmp_path, new)
    # A tokenizer or metrics saved beside the model are not the model's files: they stay, as with transformers.
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "all_results.json").is_file()
    assert scratch_folders(tmp_path) == []


@pytest.mark.parametrize(
    "first, second", [("20KB", "50GB"), ("50GB", "20KB")], ids=["shards-then-single", "single-then-shards"]
)
def test_save_pretrained_removes_its_stale_weight_files(previous_and_new, tmp_path, first, second):
    previous, new = previous_and_new
    previous.save_pretrained(tmp_path, max_shard_size=first)
    new.save_pretrained(tmp_path, max_shard_size=second)
    weight_files = sorted(name for name in os.listdir(tmp_path) if name.startswith("model") and ".safetensors" in name)
    if second == "50GB":
        assert weight_files == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert weight_files == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
    assert_loads_as(tmp_path, new)


def test_weight_files_get_the_permissions_of_the_other_files(previous_and_new, tmp_path):
    previous, _ = previous_and_new
    umask = os.umask(0o027)
    try:
        previous.save_pretrained(tmp_path / "full")
        previous.save_otter(tmp_path / "inserted")
    finally:
        os.umask(umask)
    modes = {
        path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in tmp_path.rglob("*")
        if path.is_file()
    }
    assert "full/model.safetensors" in modes and f"inserted/{OTTER_WEIGHTS_NAME}" in modes
    assert set(modes.values()) == {0o640}, modes


@pytest.mark.parametrize("moved", [False, True], ids=["before-a-move", "after-a-move"])
def test_an_interrupted_save_leaves_the_previous_checkpoint(previous_and_new, tmp_path, monkeypatch, moved):
    previous, new = previous_and_new
    folder = tmp_path / "checkpoint"
    prepare_previous(folder, previous)
    before = sorted(os.listdir(folder))
    prepare_previous(tmp_path / "count", previous)
    total = count_moves(lambda: new.save_pretrained(tmp_path / "count"), tmp_path / "count", monkeypatch)
    # Interrupted once at each move, before it or right after it; right after the last one (the commit point)
    # the save is complete, as the killed-save test checks.
    for interrupted_at in range(total - 1 if moved else total):
        with monkeypatch.context() as patch:
            moves_into_or_out_of(folder, patch, interrupt_at(interrupted_at, after_the_move=moved))
            with pytest.raises(Interrupted):
                new.save_pretrained(folder)
        assert sorted(os.listdir(folder)) == before, interrupted_at
        assert_loads_as(folder, previous)


def test_an_interrupted_first_save_leaves_no_folder(previous_and_new, tmp_path, monkeypatch):
    _, new = previous_and_new
    with monkeypatch.context() as patch:
        moves_into_or_out_of(tmp_path / "checkpoint", patch, interrupt_at(0))
        with pytest.raises(Interrupted):
            new.save_pretrained(tmp_path / "checkpoint")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("moved", [False, True], ids=["before-a-move", "after-a-move"])
@pytest.mark.parametrize("settled_by", ["load", "save"])
def test_what_a_killed_save_leaves_is_settled_by_the_next_load_or_save(
    previous_and_new, tmp_path, monkeypatch, moved, settled_by
):
    previous, new = previous_and_new
    folder = tmp_path / "checkpoint"
    prepare_previous(folder, previous)
    prepare_previous(tmp_path / "count", previous)
    total = count_moves(lambda: new.save_pretrained(tmp_path / "count"), tmp_path / "count", monkeypatch)
    for killed_at in range(total):
        # The folder as a process killed at this point leaves it: a copy taken there, scratch folder included.
        left = tmp_path / f"killed-{killed_at}"
        with monkeypatch.context() as patch:
            leave_a_copy = functools.partial(shutil.copytree, folder, left, symlinks=True)
            moves_into_or_out_of(
                folder, patch, interrupt_at(killed_at, after_the_move=moved, on_interrupt=leave_a_copy)
            )
            with pytest.raises(Interrupted):
                new.save_pretrained(folder)
        assert len(scratch_folders(left)) == 1
        committed = moved and killed_at == total - 1
        if settled_by == "load":
            assert_loads_as(left, new if committed else previous)
        else:
            new.save_pretrained(left)
            assert_loads_as(left, new)
        assert scratch_folders(left) == []
        assert (left / "tokenizer.json").is_file()


def test_an_interrupted_save_otter_leaves_the_previous_inserted_weights(previous_and_new, tmp_path, monkeypatch):
    previous, new = previous_and_new
    previous.save_otter(tmp_path)
    expected = (tmp_path / OTTER_WEIGHTS_NAME).read_bytes(), (tmp_path / OTTER_CONFIG_NAME).read_bytes()
    previous.save_otter(tmp_path / "count")
    total = count_moves(lambda: new.save_otter(tmp_path / "count"), tmp_path / "count", monkeypatch)
    assert total == 3  # the weights aside, the weights in, the config over the previous one
    for interrupted_at in range(total):
        with monkeypatch.context() as patch:
            moves_into_or_out_of(tmp_path, patch, interrupt_at(interrupted_at))
            with pytest.raises(Interrupted):
                new.save_otter(tmp_path)
        assert ((tmp_path / OTTER_WEIGHTS_NAME).read_bytes(), (tmp_path / OTTER_CONFIG_NAME).read_bytes()) == expected
    new.save_otter(tmp_path)
    reattached = otter_hf.load_otter(make_base("llama-gqa-tied"), tmp_path)
    assert reattached.config.inserted_hidden_size == new.config.inserted_hidden_size


def test_a_running_save_is_left_alone(tmp_path):
    scratch = tmp_path / f"{SCRATCH_PREFIX}running"
    (scratch / "new").mkdir(parents=True)
    (scratch / "new" / "config.json").write_text("{}")
    with open(scratch / "lock", "w") as lock:
        persistence._lock(lock)
        persistence.recover_interrupted_saves(tmp_path)
        assert (scratch / "new" / "config.json").is_file()
    persistence.recover_interrupted_saves(tmp_path)
    assert os.listdir(tmp_path) == []


# Run in a child process that kills itself (SIGKILL: no cleanup runs) after its save moved a few files.
KILLED_SAVE = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from tests.helpers import make_base, make_otter
from otter_hf.modeling import persistence

replace, moves = os.replace, []

def replace_then_die(source, destination):
    replace(source, destination)
    if os.path.dirname(destination) == sys.argv[1] or os.path.dirname(source) == sys.argv[1]:
        moves.append(destination)
        if len(moves) == 3:
            os.kill(os.getpid(), signal.SIGKILL)

persistence.os.replace = replace_then_die
new = make_otter(make_base("llama-gqa-tied"), seed=2, inserted_hidden_size=24, inserted_intermediate_size=40)
new.save_pretrained(sys.argv[1])
"""


def test_a_save_killed_in_another_process_is_rolled_back_by_the_next_load(previous_and_new, tmp_path):
    previous, _ = previous_and_new
    folder = tmp_path / "checkpoint"
    prepare_previous(folder, previous)
    completed = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(folder), REPOSITORY], capture_output=True, timeout=300
    )
    assert completed.returncode == -9, completed.stderr.decode()[-2000:]
    assert len(scratch_folders(folder)) == 1
    assert_loads_as(folder, previous)
    assert scratch_folders(folder) == []


def test_load_otter_settles_a_killed_save_otter(previous_and_new, tmp_path, monkeypatch):
    previous, new = previous_and_new
    folder = tmp_path / "inserted"
    previous.save_otter(folder)

    def kill_after_the_weights_moved_in(index, source, destination, replace):
        replace(source, destination)
        if index == 1:  # the new weights are in, the config is still the previous one
            shutil.copytree(folder, tmp_path / "killed", symlinks=True)
            raise Interrupted

    with monkeypatch.context() as patch:
        moves_into_or_out_of(folder, patch, kill_after_the_weights_moved_in)
        with pytest.raises(Interrupted):
            new.save_otter(folder)
    reattached = otter_hf.load_otter(make_base("llama-gqa-tied"), tmp_path / "killed")
    assert reattached.config.inserted_hidden_size == previous.config.inserted_hidden_size
    assert all(
        torch.equal(p, dict(previous.otter_named_parameters())[name]) for name, p in reattached.otter_named_parameters()
    )
    assert scratch_folders(tmp_path / "killed") == []
