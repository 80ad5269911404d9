"""Resuming from a crafted or damaged checkpoint: each file a resumed run reads is checked before it is used, and a
bad one is one clear error naming the file and the field, never a crash, a raw KeyError or a NaN applied."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file

import otter_hf
from otter_hf.trainers import OtterRewardConfig, OtterRewardTrainer
from otter_hf.trainers.trainer_state import load_state, save_state
from tests.helpers import make_base, make_tokenizer

PAIRS = Dataset.from_list(
    [{"prompt": "how was it ?", "chosen": " great , thanks !", "rejected": " awful ."} for _ in range(8)]
)


def train(output_dir, resume_from=None) -> dict[str, torch.Tensor]:
    """Four steps of reward training on a tiny model, a checkpoint every two; resumed from `resume_from`."""
    torch.manual_seed(0)
    otter = otter_hf.insert(make_base("llama-gqa-tied"))
    args = OtterRewardConfig(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = OtterRewardTrainer(otter, args=args, train_dataset=PAIRS, processing_class=make_tokenizer())
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return dict(otter.otter_named_parameters())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    train(output)
    return output / "checkpoint-2"


@pytest.fixture
def crafted(checkpoint, tmp_path):
    """A copy of a good checkpoint, to tamper with."""
    copy = tmp_path / "crafted"
    shutil.copytree(checkpoint, copy)
    return copy


def edit_state(folder, name, edit) -> None:
    path = os.path.join(folder, name)
    state = load_state(path)
    edit(state)
    save_state(state, path)


def refused(crafted, tmp_path, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train(tmp_path / "resumed", resume_from=crafted)


def test_the_good_checkpoint_resumes(checkpoint, tmp_path):
    train(tmp_path / "resumed", resume_from=checkpoint)


def test_a_shrunk_exp_avg_is_refused_and_does_not_crash_the_process(crafted, tmp_path):
    """Fused AdamW writes out of bounds on a shrunk `exp_avg` (a segfault): run in a subprocess, so that a crash
    fails this test rather than the whole run."""
    edit_state(crafted, "optimizer.safetensors", lambda state: state["state"][0].update(exp_avg=torch.zeros(1)))
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys; sys.path.insert(0, {repository!r}); from tests.test_resume_checks import train\n"
        f"try:\n    train({str(tmp_path / 'resumed')!r}, resume_from={str(crafted)!r})\n"
        "except ValueError as error:\n    print('REFUSED', error)\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED Cannot resume from" in result.stdout
    assert "optimizer.safetensors: `state.0.exp_avg` is a torch.float32 tensor of shape (1,)" in result.stdout


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda s: s["state"][0].update(exp_avg=s["state"][0]["exp_avg"].half()),
            r"`state.0.exp_avg` is a torch.float16",
        ),
        (lambda s: s["state"][1]["exp_avg_sq"].fill_(float("nan")), r"`state.1.exp_avg_sq` holds NaN"),
        (lambda s: s["state"][0]["step"].fill_(-3), r"`state.0.step` is -3.0, below 0"),
        (lambda s: s["param_groups"][0].update(lr=float("nan")), r"`param_groups\[0\].lr` is nan, not a finite"),
        (lambda s: s["param_groups"][0].update(lr=-1.0), r"`param_groups\[0\].lr` is -1.0, not a learning rate"),
        (lambda s: s["param_groups"][0].update(betas=(0.9, 1.5)), r"`param_groups\[0\].betas` is 1.5"),
        (lambda s: s["param_groups"][0].update(lr="0.1"), r"`param_groups\[0\].lr` is a str, not a number"),
        (lambda s: s["param_groups"][0].update(params=[0]), r"`param_groups\[0\].params` is a list, not a list of"),
        (lambda s: s["state"].update({10**6: {}}), r"`state.1000000` names no parameter"),
        (lambda s: s.pop("param_groups"), r"`state dict` is not an optimizer state"),
    ],
    ids=[
        "dtype",
        "nan-moment",
        "negative-step",
        "nan-lr",
        "negative-lr",
        "beta",
        "string-lr",
        "params",
        "index",
        "keys",
    ],
)
def test_a_crafted_optimizer_state_is_refused_naming_the_field(crafted, tmp_path, edit, match):
    edit_state(crafted, "optimizer.safetensors", edit)
    refused(crafted, tmp_path, r"optimizer\.safetensors: " + match)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update(last_epoch="2"), r"`state.last_epoch` is a str, not an integer"),
        (lambda s: s["base_lrs"].__setitem__(0, float("inf")), r"`state.base_lrs\[0\]` is inf"),
        (lambda s: s.pop("base_lrs"), r"`state` holds"),
    ],
    ids=["type", "infinite", "missing"],
)
def test_a_crafted_scheduler_state_is_refused_naming_the_field(crafted, tmp_path, edit, match):
    edit_state(crafted, "scheduler.safetensors", edit)
    refused(crafted, tmp_path, r"scheduler\.safetensors: " + match)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update(cpu=s["cpu"][:10]), r"`state.cpu` is a torch.uint8 tensor of shape \(10,\)"),
        (lambda s: s.update(python=(3, (1, 2), None)), r"`state.python\[1\]` is a tuple, not a tuple of 625"),
        (lambda s: s.update(python=(3, (2**40,) * 625, None)), r"`state` is no generator state"),
    ],
    ids=["torch", "python", "python-values"],
)
def test_a_crafted_generator_state_is_refused_naming_the_field(crafted, tmp_path, edit, match):
    edit_state(crafted, "rng_state.safetensors", edit)
    refused(crafted, tmp_path, r"rng_state\.safetensors: " + match)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", r"`file` is not valid JSON \(JSONDecodeError\)"),
        ("[" * 100_000 + "]" * 100_000, r"`file` is not valid JSON \(RecursionError\)"),
        ("[1, 2]", r"`file` holds a list, not a JSON object"),
        ('{"global_step": "two"}', r"`global_step` is a str \('two'\), not an integer"),
        ('{"global_step": -2}', r"`global_step` is a int \(-2\), not an integer, at least 0"),
        ('{"epoch": NaN}', r"`epoch` is a float \(nan\), not a finite number"),
        ('{"log_history": {"loss": 1}}', r"`log_history` is a dict"),
        ('{"stateful_callbacks": {"TrainerControl": 3}}', r"`stateful_callbacks` is a dict"),
        ('{"surprise": 1}', r"`surprise` is not a field of transformers' TrainerState"),
    ],
    ids=["syntax", "nesting", "list", "step-type", "step-range", "nan", "history", "callbacks", "unknown"],
)
def test_a_crafted_trainer_state_is_refused_naming_the_field(crafted, tmp_path, content, match):
    (crafted / "trainer_state.json").write_text(content)
    refused(crafted, tmp_path, r"trainer_state\.json: " + match)


def test_a_state_file_that_does_not_decode_is_refused_naming_it(crafted, tmp_path):
    path = crafted / "scheduler.safetensors"
    save_file({}, path, metadata={"otter_trainer_state": json.dumps({"base_lrs": {"__tensor__": "absent"}})})
    refused(crafted, tmp_path, r"scheduler\.safetensors cannot be read as a trainer state \(KeyError")
    save_file({}, path, metadata={"otter_trainer_state": "[" * 100_000 + "]" * 100_000})
    refused(crafted, tmp_path, r"scheduler\.safetensors cannot be read as a trainer state \(RecursionError")
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    refused(crafted, tmp_path, r"scheduler\.safetensors cannot be read as a trainer state")


def test_a_planted_scaler_pickle_is_refused(crafted, tmp_path):
    (crafted / "scaler.pt").write_bytes(b"a pickle would run code here")
    refused(crafted, tmp_path, r"pickles \(scaler.pt\).*does not unpickle")


def test_a_checkpoint_without_trainer_state_is_refused(crafted, tmp_path):
    (crafted / "trainer_state.json").unlink()
    refused(crafted, tmp_path, r"holds no trainer_state.json")


def test_pushing_a_checkpoint_to_the_hub_writes_no_pickle(checkpoint, tmp_path, monkeypatch):
    """transformers' Trainer pickles the training arguments into `training_args.bin` beside each checkpoint it
    pushes; an Otter trainer writes `training_args.json` instead, and the upload holds no pickle."""
    import transformers.trainer

    uploaded = []

    class Hub:
        def upload_folder(self, folder_path, **options):
            uploaded.append(sorted(os.listdir(folder_path)))
            return type("Done", (), {"done": lambda self: True})()

    monkeypatch.setattr(transformers.trainer, "hf_api", Hub)
    torch.manual_seed(0)
    args = OtterRewardConfig(output_dir=str(tmp_path / "out"), report_to=[], push_to_hub=False)
    trainer = OtterRewardTrainer(
        otter_hf.insert(make_base("llama-gqa-tied")), args=args, train_dataset=PAIRS, processing_class=make_tokenizer()
    )
    trainer.hub_model_id, trainer.push_in_progress = "user/otter", None
    os.makedirs(args.output_dir, exist_ok=True)
    trainer._push_from_checkpoint(str(checkpoint))
    assert uploaded and all("training_args.json" in names for names in uploaded)
    assert not [name for names in uploaded for name in names if name.endswith((".bin", ".pt", ".pth"))]
    saved = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert saved["output_dir"] == args.output_dir
