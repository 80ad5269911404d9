"""The Otter trainers across processes: DDP over gloo on CPU, launched by `accelerate launch` and `torchrun`.

Each run is tests/multiprocess_script.py on a tiny model; see its docstring for what every process reports. The
runs that are compared train with plain SGD, so the weights show the gradients themselves: Adam divides each
gradient by its own running magnitude, which turns float rounding in a gradient near zero into a whole step.
Opt in with `-m multiprocess`.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from otter_hf.trainers.trainer_state import load_state
from tests.helpers import REPOSITORY, make_base, make_tokenizer

pytestmark = pytest.mark.multiprocess

SCRIPT = os.path.join(REPOSITORY, "tests", "multiprocess_script.py")
TOLERANCE = 1e-5


def free_port() -> int:
    # The machine may run other launches: the default rendezvous port 29500 could be taken.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(launcher: str, config_file: str | None = None) -> list[str]:
    if launcher == "python":
        return [sys.executable]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ]
    if config_file is not None:  # `--multi_gpu` would override the config's distributed type
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            config_file,
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
        ]
    # accelerate's `--cpu` launcher starts one process (more need mpirun); `--multi_gpu` starts them through
    # torch.distributed.run, and the Trainer's `use_cpu=True` makes them a gloo group on a machine without GPUs.
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def launch(command: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


class Run:
    def __init__(self, folder: str):
        self.folder = folder
        self.reports = []
        self.weights = []
        with open(os.path.join(folder, "rank0.json")) as file:
            world_size = json.load(file)["world_size"]
        for rank in range(world_size):
            with open(os.path.join(folder, f"rank{rank}.json")) as file:
                self.reports.append(json.load(file))
            self.weights.append(load_file(os.path.join(folder, f"rank{rank}.safetensors")))
        self.initial = load_file(os.path.join(folder, "initial.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`run(launcher, kind, *options, config_file=None)`: the results of one launch, each made once per module."""
    done = {}

    def run(launcher: str, kind: str, *options: str, config_file: str | None = None) -> Run:
        key = (launcher, kind, *options, config_file)
        if key not in done:
            folder = str(tmp_path_factory.mktemp(f"{launcher}-{kind}"))
            command = [*launch_command(launcher, config_file), SCRIPT, kind, folder, *options]
            result = launch(command)
            if result.returncode != 0:
                raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
            done[key] = Run(folder)
        return done[key]

    return run


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


def check_communication(run: Run, unread_heads: tuple[str, ...]) -> None:
    """Every process trained the same weights, and DDP all-reduced exactly the trainable inserted parameters."""
    for report, weights in zip(run.reports, run.weights):
        assert report["world_size"] == 2
        trainable = set(report["trainable"])
        assert trainable <= set(report["inserted"])
        assert not any(name.split(".")[0] in unread_heads for name in trainable)
        assert set(report["with_gradient"]) == trainable
        assert set(report["all_reduced"]) == trainable
        assert report["reducer"]["num_parameter_tensors"] == len(trainable)
        assert report["reducer"]["find_unused_parameters"] == 0
        assert report["reducer"]["total_parameter_size_bytes"] == report["trainable_bytes"]
        assert max_difference(weights, run.weights[0]) == 0.0
    assert max_difference(run.weights[0], run.initial) > 1e-3  # it trained


GLOBAL_BATCH = ["--global-batch", "8", "--optim", "sgd", "--learning-rate", "0.02"]


@pytest.mark.parametrize("kind", ["reward", "token-reward"])
def test_two_processes_train_the_weights_of_one_process_at_twice_the_batch(run, kind):
    one = run("python", kind, "--batch-size", "8", *GLOBAL_BATCH)
    two = run("accelerate", kind, "--batch-size", "4", *GLOBAL_BATCH)
    unread = ("draft_heads",) if kind == "reward" else ("draft_heads", "v_head")
    check_communication(two, unread_heads=unread)
    assert max_difference(two.weights[0], one.weights[0]) < TOLERANCE
    assert max_difference(one.weights[0], one.initial) > 1e-3


@pytest.mark.parametrize("kind", ["reward", "token-reward"])
def test_gradient_accumulation_trains_the_weights_of_the_whole_batch(run, kind):
    whole = run("python", kind, "--batch-size", "8", *GLOBAL_BATCH)
    accumulated = run("python", kind, "--batch-size", "2", "--accumulation", "4", *GLOBAL_BATCH)
    assert max_difference(accumulated.weights[0], whole.weights[0]) < TOLERANCE


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate runs FSDP only on GPUs (on CPU it gives DDP)")
def test_fsdp2_trains_the_weights_of_one_process(run):
    config = os.path.join(REPOSITORY, "examples", "accelerate_configs", "fsdp2.yaml")
    one = run("python", "reward", "--batch-size", "8", *GLOBAL_BATCH)
    fsdp = run("accelerate", "reward", "--batch-size", "4", *GLOBAL_BATCH, config_file=config)
    assert fsdp.reports[0]["reducer"] is None  # not DDP
    assert max_difference(fsdp.weights[0], fsdp.weights[1]) == 0.0
    assert max_difference(fsdp.weights[0], one.weights[0]) < TOLERANCE
    assert all(report["original_logits_equal"] for report in fsdp.reports)


def test_deepspeed_zero2_trains_the_weights_of_one_process(run):
    pytest.importorskip("deepspeed")
    one = run("python", "reward", "--batch-size", "8", *GLOBAL_BATCH)
    zero2 = run("torchrun", "reward", "--batch-size", "4", *GLOBAL_BATCH, "--deepspeed-stage", "2")
    assert max_difference(zero2.weights[0], zero2.weights[1]) == 0.0
    assert max_difference(zero2.weights[0], one.weights[0]) < TOLERANCE
    assert max_difference(zero2.weights[0], zero2.initial) > 1e-3


def test_deepspeed_zero3_is_refused_with_the_reason(tmp_path):
    pytest.importorskip("deepspeed")
    result = launch(
        [*launch_command("torchrun"), SCRIPT, "reward", str(tmp_path), "--global-batch", "4", "--deepspeed-stage", "3"]
    )
    assert result.returncode != 0
    assert "Use ZeRO-2 (or ZeRO-1), or FSDP2" in result.stderr


@pytest.mark.parametrize(
    "kind, unread_heads",
    [
        ("value", ("token_reward_head",)),
        ("draft-heads", ("v_head",)),
        ("draft-recurrent", ("v_head",)),
        ("experts", ("v_head", "token_reward_head")),
    ],
)
def test_every_trainer_runs_under_torchrun(run, kind, unread_heads):
    two = run("torchrun", kind, "--batch-size", "2", "--global-batch", "4")
    check_communication(two, unread_heads)
    if kind == "draft-recurrent":  # it reads the original stream alone, so only the head itself trains
        assert all(name.startswith("recurrent_draft_head.") for name in two.reports[0]["trainable"])
    for report in two.reports:
        assert report["original_logits_equal"]


def test_bf16_keeps_the_original_logits_and_a_float32_value_head(run):
    two = run("torchrun", "value", "--batch-size", "2", "--global-batch", "4", "--bf16", "--model-dtype", "bfloat16")
    check_communication(two, unread_heads=("token_reward_head",))
    for report in two.reports:
        assert report["original_logits_equal"]
        assert report["v_head_dtype"] == "torch.float32"
        assert report["value_dtype"] == "torch.float32"


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(run):
    options = ["--steps", "4", "--batch-size", "2", "--global-batch", "4"]
    uninterrupted = run("accelerate", "reward", *options, "--save-steps", "2")
    checkpoint = os.path.join(uninterrupted.folder, "trainer", "checkpoint-2")
    resumed = run("accelerate", "reward", *options, "--resume-from", checkpoint)
    assert max_difference(resumed.weights[0], uninterrupted.weights[0]) < TOLERANCE
    # Only the main process writes the inserted weights.
    assert uninterrupted.reports[0]["saves"] == ["save_otter", "save_otter"]
    assert uninterrupted.reports[1]["saves"] == []

    files = set(os.listdir(checkpoint))
    assert {"otter_model.safetensors", "otter_config.json", "optimizer.safetensors", "trainer_state.json"} <= files
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors"} <= files  # one per process
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)
    assert not [name for name in files if name.endswith((".pt", ".pth", ".bin"))]
    saved = load_file(os.path.join(checkpoint, "otter_model.safetensors"))
    assert set(saved) == set(uninterrupted.reports[0]["inserted"])
    optimizer = load_state(os.path.join(checkpoint, "optimizer.safetensors"))
    trainable = uninterrupted.reports[0]["trainable"]
    # Adam's two moments (and its step count) for each trainable parameter, and nothing for the frozen base.
    assert len(optimizer["state"]) == len(trainable)
    assert sum(state["exp_avg"].numel() for state in optimizer["state"].values()) == sum(
        saved[name].numel() for name in trainable
    )


def test_the_train_command_on_two_processes_writes_once(tmp_path):
    from transformers import AutoModelForCausalLM

    import otter_hf

    otter_hf.insert(make_base("llama-gqa-tied")).save_pretrained(tmp_path / "otter")
    make_tokenizer().save_pretrained(tmp_path / "otter")
    rows = [
        {"chosen": "it was great !", "rejected": "it was awful ."},
        {"chosen": "so kind .", "rejected": "so rude ."},
    ] * 4
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    command = [
        *launch_command("torchrun"),
        "-m",
        "otter_hf",
        "train",
        str(tmp_path / "otter"),
        "--dataset",
        str(tmp_path / "pairs.jsonl"),
        "--output-dir",
        str(tmp_path / "trained"),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--learning-rate",
        "1e-2",
    ]
    result = launch(command)
    assert result.returncode == 0, result.stderr[-6000:]
    assert result.stdout.count("Trained the value head") == 1
    # Two processes of two pairs each: one epoch of the eight pairs in two steps.
    assert json.loads((tmp_path / "trained" / "train_results.json").read_text())["epoch"] == 1.0
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "otter")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert max_difference(dict(after.otter_named_parameters()), dict(before.otter_named_parameters())) > 1e-3


def test_processes_that_would_train_alone_are_refused(monkeypatch, tmp_path):
    from datasets import Dataset

    import otter_hf
    from otter_hf.trainers import OtterRewardConfig, OtterRewardTrainer
    from tests.multiprocess_script import INSERTION, preference_rows

    monkeypatch.setenv("WORLD_SIZE", "2")
    model = otter_hf.insert(make_base("llama-gqa-tied"), **INSERTION["reward"])
    config = OtterRewardConfig(output_dir=str(tmp_path), report_to=[], bf16=False)
    with pytest.raises(ValueError, match="use_cpu=True"):
        OtterRewardTrainer(
            model, args=config, train_dataset=Dataset.from_list(preference_rows(4)), processing_class=make_tokenizer()
        )


def test_fsdp2_gets_a_unit_for_the_float32_value_head_and_no_resharding_after_the_forward():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    import otter_hf
    from otter_hf.trainers.distributed import prepare_fsdp2_plugin

    model = otter_hf.insert(make_base("llama-gqa-tied").to(torch.bfloat16))
    assert model.v_head.summary.weight.dtype == torch.float32
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=False
    )
    prepare_fsdp2_plugin(plugin, model)
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert wraps(model.v_head) and all(wraps(layer) for layer in model.model.layers)
    assert not wraps(model.lm_head)

    resharding = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    with pytest.raises(ValueError, match="reshard_after_forward"):
        prepare_fsdp2_plugin(resharding, model)


def test_the_best_checkpoint_is_loaded_back_from_its_inserted_parameters(tmp_path):
    import otter_hf
    from tests.multiprocess_script import INSERTION, training_setup

    model = otter_hf.insert(make_base("llama-gqa-tied"), **INSERTION["reward"])
    config_class, trainer_class, dataset = training_setup("reward", 8)
    config = config_class(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        # The eval loss falls step by step here: the "best", the highest, is an earlier checkpoint than the last.
        eval_strategy="steps",
        eval_steps=1,
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        report_to=[],
        disable_tqdm=True,
        max_length=64,
    )
    trainer = trainer_class(
        model, args=config, train_dataset=dataset, eval_dataset=dataset, processing_class=make_tokenizer()
    )
    trainer.train()
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, "otter_model.safetensors"))
    last = load_file(os.path.join(tmp_path, "checkpoint-3", "otter_model.safetensors"))
    assert max_difference(best, last) > 0  # the best is not simply the last
    assert max_difference(dict(model.otter_state_dict()), best) == 0.0


def test_otter_grpo_trains_one_adapter_over_two_processes(tmp_path):
    script = os.path.join(REPOSITORY, "tests", "multiprocess_grpo_script.py")
    command = [*launch_command("accelerate"), script, str(tmp_path)]
    result = launch(command)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    adapters = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]
    assert all(report["world_size"] == 2 and report["frozen_unchanged"] for report in reports)
    assert len(reports[0]["otter_rewards"]) == 2
    assert max_difference(adapters[0], adapters[1]) == 0.0  # DDP kept the two adapters equal
    assert any(tensor.abs().sum() > 0 for name, tensor in adapters[0].items() if "lora_B" in name)  # it trained
    checkpoint = os.listdir(tmp_path / "out" / "checkpoint-2")
    assert "adapter_model.safetensors" in checkpoint and "otter_model.safetensors" not in checkpoint
