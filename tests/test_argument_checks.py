"""Bad arguments fail at once with one clear error: generate()'s guidance and inputs, trainers' datasets and
divergence, and the command line."""

import json
import math
import re

import pytest
import torch
from datasets import Dataset
from transformers.testing_utils import CaptureLogger

from otter_hf.trainers import OtterRewardConfig, OtterRewardTrainer, OtterValueConfig, OtterValueTrainer
from otter_hf.trainers import utils as trainer_utils
from otter_hf.trainers.safeguards import TrainingDivergedError
from tests.helpers import COMMON, make_base, make_otter, random_batch, run_cli


@pytest.fixture(scope="module")
def model():
    return make_otter(make_base("llama-gqa-tied"), token_reward_head=True).eval()


@pytest.mark.parametrize(
    "guidance, message",
    [
        (dict(reward_weight=float("nan")), "`reward_weight` must be a finite number, got nan"),
        (dict(reward_weight=float("inf")), "`reward_weight` must be a finite number, got inf"),
        (dict(reward_weight=True), "`reward_weight` must be a finite number, got True"),
        (dict(token_reward_weight=float("nan")), "`token_reward_weight` must be a finite number, got nan"),
        # Finite but huge: weight * log_softmax overflows float32, every score -inf, greedy decoding emits token 0.
        (dict(token_reward_weight=1e308), r"`token_reward_weight` must be a finite number, got 1e\+308; its magnitude"),
        (dict(reward_weight=-1e308), r"`reward_weight` must be a finite number, got -1e\+308; its magnitude"),
        (dict(reward_weight=10**400), r"`reward_weight` must be a finite number, got 10+\.\.\.; its magnitude"),
        (dict(reward_weight="2"), r"`reward_weight` must be a finite number, got '2' \(str\)"),
        (dict(reward_weight=1.0, reward_top_k=0), "`reward_top_k` must be an integer from 1 to the vocabulary size 96"),
        (dict(reward_weight=1.0, reward_top_k=COMMON["vocab_size"] + 1), "got 97"),
    ],
)
def test_generate_refuses_guidance_that_is_not_a_finite_number(model, guidance, message):
    input_ids, attention_mask = random_batch(2, 6)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=2, **guidance)


def test_the_largest_guidance_weight_keeps_every_guided_score_finite(model):
    """At the bound, `weight * log_softmax` stays finite in float32 for log-probabilities down to -1e4, so decoding
    picks real tokens; just above it, the weight is refused."""
    from otter_hf.modeling.guidance_weight import GUIDANCE_MAGNITUDE, MAX_GUIDANCE_WEIGHT

    log_probabilities = torch.tensor([-GUIDANCE_MAGNITUDE, -1.0, 0.0])
    scores = torch.tensor([-GUIDANCE_MAGNITUDE, 0.0, GUIDANCE_MAGNITUDE])
    for weight in (MAX_GUIDANCE_WEIGHT, -MAX_GUIDANCE_WEIGHT):
        assert torch.isfinite(scores + torch.tensor(weight) * log_probabilities).all()
    input_ids, attention_mask = random_batch(2, 6)
    output = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=3,
        do_sample=False,
        token_reward_weight=-MAX_GUIDANCE_WEIGHT,
    )
    assert output.shape == (2, 9)
    with pytest.raises(ValueError, match="its magnitude must be at most"):
        model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=1, token_reward_weight=MAX_GUIDANCE_WEIGHT * 2
        )


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), True, "2", 1e308, 10**400])
def test_the_reward_logits_processor_refuses_a_weight_that_is_not_a_bounded_number(model, weight):
    from otter_hf.generation import OtterRewardLogitsProcessor

    with pytest.raises(ValueError, match="`weight` must be a finite number"):
        OtterRewardLogitsProcessor(model, weight=weight)


def test_reward_guided_generate_refuses_a_huge_weight_passed_to_it_directly(model):
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from otter_hf.generation import reward_guided_generate

    input_ids, _ = random_batch(1, 4)
    with pytest.raises(ValueError, match=r"`reward_weight` must be a finite number, got 1e\+300"):
        reward_guided_generate(
            model,
            input_ids,
            LogitsProcessorList(),
            StoppingCriteriaList(),
            model.generation_config,
            reward_weight=1e300,
        )


@pytest.mark.parametrize(
    "inputs, message",
    [
        (
            lambda ids, mask: dict(input_ids=ids, attention_mask=mask[:1]),
            r"shape of `input_ids`, \(2, 6\), got \(1, 6\)",
        ),
        (lambda ids, mask: dict(input_ids=ids, attention_mask=mask[:, :5]), r"got \(2, 5\)"),
        (
            lambda ids, mask: dict(input_ids=ids, attention_mask=torch.stack([mask[0], torch.zeros_like(mask[1])])),
            r"Rows \[1\].*all padding",
        ),
        (lambda ids, mask: dict(input_ids=ids[:, :0]), "`input_ids` is empty"),
        (
            lambda ids, mask: dict(input_ids=ids + COMMON["vocab_size"], attention_mask=mask),
            "outside this model's vocabulary",
        ),
    ],
    ids=["broadcast-mask", "short-mask", "all-padding-row", "empty", "out-of-vocabulary"],
)
@pytest.mark.parametrize(
    "guidance", [{}, dict(reward_weight=1.0), dict(token_reward_weight=1.0)], ids=["plain", "args", "token-reward"]
)
def test_generate_checks_its_inputs_before_any_forward(model, monkeypatch, inputs, message, guidance):
    input_ids, attention_mask = random_batch(2, 6)
    monkeypatch.setattr(type(model), "forward", lambda *args, **kwargs: pytest.fail("a forward ran"))
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs(input_ids, attention_mask), max_new_tokens=2, **guidance)


# -- trainers --------------------------------------------------------------------------------------------------


def test_training_stops_at_the_first_non_finite_gradient_and_leaves_the_weights_finite(tmp_path, tiny_tokenizer):
    model = make_otter(make_base("llama-gqa-tied"))
    rows = [{"completion": "good movie", "label": 1.0}, {"completion": "bad day", "label": float("nan")}]
    args = OtterValueConfig(tmp_path, max_steps=3, per_device_train_batch_size=2, report_to="none", save_strategy="no")
    trainer = OtterValueTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer
    )
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 1:.*learning rate 0\.0001.*lower learning rate"):
        trainer.train()
    assert all(torch.isfinite(parameter).all() for parameter in model.otter_parameters())


def test_reward_training_at_a_huge_learning_rate_stops_instead_of_saving_nan(tmp_path, tiny_tokenizer):
    model = make_otter(make_base("llama-gqa-tied"))
    rows = [{"chosen": "good movie", "rejected": "bad day"}] * 4
    args = OtterRewardConfig(
        tmp_path, max_steps=20, learning_rate=1e12, per_device_train_batch_size=2, report_to="none", save_strategy="no"
    )
    trainer = OtterRewardTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer
    )
    with pytest.raises(TrainingDivergedError, match="diverged at step"):
        trainer.train()
    trainer.save_model(tmp_path / "saved")  # what was trained up to the diverging step is still whole
    assert all(torch.isfinite(parameter).all() for parameter in model.otter_parameters())


@pytest.mark.parametrize("trainer_class", [OtterRewardTrainer, OtterValueTrainer])
def test_trainers_name_an_empty_dataset(tmp_path, tiny_tokenizer, trainer_class):
    columns = ["chosen", "rejected"] if trainer_class is OtterRewardTrainer else ["completion", "label"]
    empty = Dataset.from_dict({column: [] for column in columns})
    config_class = OtterRewardConfig if trainer_class is OtterRewardTrainer else OtterValueConfig
    with pytest.raises(ValueError, match="The train dataset is empty"):
        trainer_class(
            make_otter(make_base("llama-gqa-tied")),
            args=config_class(tmp_path, report_to="none"),
            train_dataset=empty,
            processing_class=tiny_tokenizer,
        )


@pytest.mark.parametrize("trainer_class", [OtterRewardTrainer, OtterValueTrainer])
def test_trainers_count_rows_dropped_for_length_and_refuse_when_none_fits(tmp_path, tiny_tokenizer, trainer_class):
    long_text = " ".join(["good"] * 12)
    if trainer_class is OtterRewardTrainer:
        rows = [{"chosen": "good movie", "rejected": "bad"}] * 3 + [{"chosen": long_text, "rejected": "bad"}]
        config_class, dropped_rows = OtterRewardConfig, [{"chosen": long_text, "rejected": long_text}] * 2
    else:
        rows = [{"prompt": "tell", "completion": "good", "label": 1.0}] * 3 + [
            {"prompt": long_text, "completion": "bad", "label": 0.0}
        ]
        config_class, dropped_rows = OtterValueConfig, [{"prompt": long_text, "completion": "bad", "label": 0.0}] * 2
    args = config_class(tmp_path, max_length=8, report_to="none")
    model = make_otter(make_base("llama-gqa-tied"))
    with CaptureLogger(trainer_utils.logger) as captured:
        trainer = trainer_class(
            model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer
        )
    assert len(trainer.train_dataset) == 3
    assert "Dropped 1 of the 4 rows of the train dataset" in captured.out
    with pytest.raises(ValueError, match="No row of the train dataset fits max_length=8: all 2 were dropped"):
        trainer_class(model, args=args, train_dataset=Dataset.from_list(dropped_rows), processing_class=tiny_tokenizer)


# -- the command line ------------------------------------------------------------------------------------------


def pairs_file(folder, rows):
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            lambda tmp: [
                "insert",
                "--base",
                tmp / "base",
                "-o",
                tmp / "out",
                "--inserted-hidden-size",
                1099511627776,
                "--init",
                "normal",
            ],
            r"`inserted_hidden_size` is 1099511627776, above its bound 256",
        ),
        (
            lambda tmp: [
                "train",
                tmp / "otter",
                "--dataset",
                (tmp / "empty.jsonl", (tmp / "empty.jsonl").write_text(""))[0],
                "--output-dir",
                tmp / "out",
            ],
            "empty.jsonl holds no rows",
        ),
        (
            lambda tmp: [
                "train",
                tmp / "otter",
                "--dataset",
                pairs_file(tmp, [{"chosen": "w5 " * 40, "rejected": "w6"}] * 2),
                "--output-dir",
                tmp / "out",
                "--max-length",
                16,
            ],
            "No row of the train dataset fits max_length=16",
        ),
        (
            lambda tmp: [
                "train",
                tmp / "otter",
                "--dataset",
                pairs_file(tmp, [{"chosen": "w5", "rejected": "w6"}]),
                "--output-dir",
                tmp / "out",
                "--max-length",
                0,
            ],
            "--max-length must be from 1 to 1048576, got 0",
        ),
        (
            lambda tmp: [
                "train",
                tmp / "otter",
                "--dataset",
                pairs_file(tmp, [{"chosen": "w5", "rejected": "w6"}]),
                "--output-dir",
                tmp / "out",
                "--epochs",
                -1,
            ],
            r"--epochs must be a positive number up to 1e\+06, got -1",
        ),
        (lambda tmp: ["bench", "--base", tmp / "base", "--threads", 0], "--threads must be from 1 to 4096, got 0"),
        (
            lambda tmp: ["bench", "--base", tmp / "base", "--prefill-tokens", 0],
            "--prefill-tokens must be from 1 to 1048576, got 0",
        ),
        (
            lambda tmp: ["generate", tmp / "otter", "--prompt", "w5", "--reward-weight", "nan"],
            "`--reward-weight` must be a finite number",
        ),
        (
            lambda tmp: ["generate", tmp / "otter", "--prompt", "w5", "--token-reward-weight", "inf"],
            "`--token-reward-weight` must be a finite number",
        ),
    ],
    ids=[
        "unallocatable-size",
        "empty-jsonl",
        "all-rows-too-long",
        "max-length-0",
        "negative-epochs",
        "bench-threads-0",
        "bench-prefill-0",
        "nan-reward-weight",
        "inf-token-reward-weight",
    ],
)
def test_bad_inputs_end_with_one_error_line_and_status_2(capsys, base_folder, tmp_path, argv, message):
    run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "otter")
    status, out, err = run_cli(capsys, *argv(tmp_path))
    assert status == 2, err
    last_line = err.splitlines()[-1]
    assert last_line.startswith("otter-hf: error: ") and re.search(message, last_line), err
    assert "Traceback" not in err


def test_training_that_diverges_ends_with_one_error_line_and_saves_nothing(capsys, base_folder, tmp_path):
    run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "otter")
    dataset = pairs_file(tmp_path, [{"completion": "w5 w6", "label": 1.0}, {"completion": "w7", "label": math.inf}])
    status, out, err = run_cli(
        capsys, "train", tmp_path / "otter", "--dataset", dataset, "--output-dir", tmp_path / "out", "--max-steps", 2
    )
    assert status == 2
    errors = re.findall(r"otter-hf: error: [^\r\n]*", err)  # after the training progress bar
    assert len(errors) == 1 and errors[0].startswith("otter-hf: error: Training diverged at step 1"), err
    assert "Trained" not in out and not (tmp_path / "out").exists()


def test_insert_without_the_embedded_model_wheel_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("OTTER_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    status, _, err = run_cli(capsys, "insert", "-o", tmp_path / "out")
    assert status == 2
    assert err.splitlines()[-1].startswith("otter-hf: error: The default base model") and "pip install" in err
