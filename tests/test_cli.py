"""The `otter-hf` command line, run on tiny models and the fake Hub."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

import otter_hf
from otter_hf.data import PREFERENCES_PATH
from otter_hf.data.files import load_dataset_file
from otter_hf.modeling.persistence import OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME
from otter_hf.overhead import is_noisy, summarize_timings
from tests.helpers import ARCHITECTURE_BASES, make_base, random_batch, run_cli

COMMANDS = ("insert", "train", "generate", "push", "bench")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(capsys, command):
    status, out, _ = run_cli(capsys, command, "--help")
    assert status == 0
    assert out.startswith(f"usage: otter-hf {command}")
    assert len(out.splitlines()) > 8


def test_help_lists_the_commands(capsys):
    status, out, _ = run_cli(capsys, "--help")
    assert status == 0
    assert all(f"    {command}" in out for command in COMMANDS)


def test_insert_saves_a_checkpoint_with_the_chosen_sizes(capsys, base_folder, tmp_path):
    status, out, err = run_cli(
        capsys,
        "insert",
        "--base",
        base_folder,
        "-o",
        tmp_path / "otter",
        "--inserted-hidden-size",
        8,
        "--inserted-num-attention-heads",
        2,
        "--inserted-intermediate-size",
        24,
        "--init",
        "normal",
    )
    assert status == 0, err
    assert "Saved the model to" in out
    otter = AutoModelForCausalLM.from_pretrained(tmp_path / "otter")
    config = otter.config
    assert (config.inserted_hidden_size, config.inserted_num_attention_heads, config.inserted_intermediate_size) == (
        8,
        2,
        24,
    )
    assert config.inserted_init == "normal"
    assert (tmp_path / "otter" / "tokenizer.json").is_file()
    input_ids, attention_mask = random_batch(2, 6, "left")
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    with torch.no_grad():
        assert torch.equal(
            otter(input_ids, attention_mask=attention_mask).logits,
            base(input_ids, attention_mask=attention_mask).logits,
        )


@pytest.mark.parametrize("base_name", ARCHITECTURE_BASES)
def test_insert_takes_a_saved_base_of_every_architecture(capsys, base_name, tmp_path):
    make_base(base_name).save_pretrained(tmp_path / "base")
    status, _, err = run_cli(
        capsys, "insert", "--base", tmp_path / "base", "-o", tmp_path / "otter", "--num-draft-heads", 2
    )
    assert status == 0, err
    otter = AutoModelForCausalLM.from_pretrained(tmp_path / "otter")
    assert otter.config.base_model_type == make_base(base_name).config.model_type
    assert otter.config.num_draft_heads == 2
    input_ids, attention_mask = random_batch(2, 6, "left")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        assert torch.equal(
            otter(input_ids, attention_mask=attention_mask).logits,
            base(input_ids, attention_mask=attention_mask).logits,
        )


def test_insert_otter_only_saves_what_load_otter_attaches(capsys, base_folder, tmp_path):
    status, _, err = run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "inserted", "--otter-only")
    assert status == 0, err
    assert sorted(path.name for path in (tmp_path / "inserted").iterdir()) == [OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME]
    model = otter_hf.load_otter(None, tmp_path / "inserted")  # the save names its base folder
    assert model.config.base_model_name_or_path == str(base_folder)


@pytest.mark.parametrize(
    "argv, message",
    [
        (lambda tmp: ["insert", "--base", tmp / "missing", "-o", tmp / "out"], "No model at"),
        (
            lambda tmp: ["insert", "--base", tmp / "neox", "-o", tmp / "out"],
            "does not support the 'gpt_neox' architecture",
        ),
        (
            lambda tmp: [
                "insert",
                "--base",
                tmp / "base",
                "-o",
                tmp / "out",
                "--inserted-num-attention-heads",
                3,
                "--inserted-num-key-value-heads",
                2,
            ],
            "must be a multiple of",
        ),
        (
            lambda tmp: ["insert", "--base", tmp / "base", "-o", tmp / "out", "--inserted-hidden-size", 0],
            "positive integer",
        ),
        (lambda tmp: ["push", tmp / "missing", "user/otter"], "No folder at"),
        (lambda tmp: ["push", tmp / "base", "user/otter"], "not an Otter model"),
        (lambda tmp: ["push", tmp / "base", "user/otter", "--metrics", tmp / "none.json"], "--metrics: no file"),
        (lambda tmp: ["generate", tmp / "missing", "--prompt", "w5"], "No model at"),
        (
            lambda tmp: ["train", tmp / "base", "--dataset", tmp / "missing.jsonl", "--output-dir", tmp / "out"],
            "--dataset: no dataset file",
        ),
    ],
    ids=[
        "missing-base",
        "unsupported-architecture",
        "bad-head-groups",
        "zero-size",
        "push-missing-folder",
        "push-plain-model",
        "push-missing-metrics",
        "generate-missing-model",
        "train-missing-dataset",
    ],
)
def test_user_mistakes_end_with_a_message_and_status_2(capsys, fake_hub, base_folder, tmp_path, argv, message):
    neox_config = GPTNeoXConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=32
    )
    GPTNeoXForCausalLM(neox_config).save_pretrained(tmp_path / "neox")
    status, _, err = run_cli(capsys, *argv(tmp_path))
    assert status == 2
    last_line = err.splitlines()[-1]  # after any loading progress bars
    assert last_line.startswith("otter-hf: error: ") and message in last_line, err
    assert "Traceback" not in err
    assert fake_hub.commits == []


def test_python_m_otter_hf_reports_a_user_mistake_without_traceback(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "otter_hf", "push", str(tmp_path / "missing"), "user/otter"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    # Lines other than otter-hf's own come from packages transformers imports at start-up (torchao, bitsandbytes).
    assert "Traceback" not in completed.stderr
    assert [line for line in completed.stderr.splitlines() if line.startswith("otter-hf")] == [
        f"otter-hf: error: No folder at {tmp_path / 'missing'}: "
        "save the model with `save_pretrained` or `save_otter` first."
    ]


def test_push_uploads_the_folder_with_its_card_in_one_commit(capsys, fake_hub, base_folder, tmp_path):
    run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "otter")
    (tmp_path / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.75, "epoch": 1.0, "note": "text"}))
    (tmp_path / "overhead.json").write_text(
        json.dumps({"threads": 2, "peak_memory": {"base_bytes": 10, "otter_bytes": 12, "ratio": 1.2}})
    )
    status, out, err = run_cli(
        capsys,
        "push",
        tmp_path / "otter",
        "user/otter",
        "--base-model",
        "org/tiny-llama",
        "--trained-on",
        "pairs",
        "--metrics",
        tmp_path / "all_results.json",
        "--overhead",
        tmp_path / "overhead.json",
        "--license",
        "apache-2.0",
        "--tag",
        "tiny",
    )
    assert status == 0, err
    assert "Pushed" in out and "user/otter" in out
    assert len(fake_hub.commits) == 1
    files = fake_hub.files("user/otter")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "otter_llama.py"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "org/tiny-llama" and card.data.license == "apache-2.0" and "tiny" in card.data.tags
    assert "| eval_accuracy | 0.75 |" in card.text and "| note |" not in card.text
    assert "| peak memory | 1.2x |" in card.text
    assert 'AutoTokenizer.from_pretrained("user/otter")' in card.text


def test_push_otter_only_needs_a_hub_base_and_uploads_the_inserted_parameters(capsys, fake_hub, base_folder, tmp_path):
    run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "otter")
    status, _, err = run_cli(capsys, "push", tmp_path / "otter", "user/otter-only", "--otter-only")
    assert status == 2 and "--base-model" in err
    status, _, err = run_cli(
        capsys, "push", tmp_path / "otter", "user/otter-only", "--otter-only", "--base-model", "org/tiny-llama"
    )
    assert status == 0, err
    assert sorted(fake_hub.files("user/otter-only")) == sorted(["README.md", OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME])


def test_train_then_generate(capsys, base_folder, tmp_path):
    run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "otter")
    rows = [{"chosen": "w5 w6 w7 w8", "rejected": "w9 w9 w9"}, {"chosen": "w5 w6", "rejected": "w40 w41 w42"}] * 4
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "otter")

    status, out, err = run_cli(
        capsys,
        "train",
        tmp_path / "otter",
        "--dataset",
        tmp_path / "pairs.jsonl",
        "--eval-dataset",
        tmp_path / "pairs.jsonl",
        "--output-dir",
        tmp_path / "trained",
        "--max-steps",
        2,
        "--batch-size",
        4,
        "--learning-rate",
        1e-2,
    )
    assert status == 0, err
    assert "reward objective" in out
    results = json.loads((tmp_path / "trained" / "all_results.json").read_text())
    assert "train_loss" in results and "eval_accuracy" in results
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    original, trained = dict(before.named_parameters()), dict(after.named_parameters())
    assert any(not torch.equal(original[name], trained[name]) for name, _ in after.otter_named_parameters())
    assert all(
        torch.equal(original[name], p)
        for name, p in trained.items()
        if not otter_hf.modeling.is_inserted_parameter(name)
    )

    status, out, err = run_cli(
        capsys, "generate", tmp_path / "trained", "--prompt", "w5 w6", "--max-new-tokens", 4, "--top-k", 3
    )
    assert status == 0, err
    assert all(word.startswith("w") for word in out.split())


def test_token_reward_head_insert_train_and_generate(capsys, base_folder, tmp_path):
    run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "otter", "--token-reward-head")
    rows = [{"prompt": "w5", "chosen": " w6 w7 w8", "rejected": " w9 w9 w9"}] * 8
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    labels = [{"prompt": "w5", "completion": " w6", "label": 1.0}] * 4
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in labels))

    status, out, err = run_cli(
        capsys,
        "train",
        tmp_path / "otter",
        "--dataset",
        tmp_path / "pairs.jsonl",
        "--eval-dataset",
        tmp_path / "pairs.jsonl",
        "--output-dir",
        tmp_path / "trained",
        "--max-steps",
        2,
        "--batch-size",
        4,
        "--learning-rate",
        1e-2,
        "--beta",
        0.5,
    )
    assert status == 0, err
    assert "token-level reward head (token-reward objective)" in out
    results = json.loads((tmp_path / "trained" / "all_results.json").read_text())
    assert "eval_rewards/accuracies" in results and "eval_rewards/margins" in results
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert trained.token_reward_head.proj.weight.abs().sum() > 0

    status, out, err = run_cli(
        capsys,
        "generate",
        tmp_path / "trained",
        "--prompt",
        "w5 w6",
        "--max-new-tokens",
        4,
        "--token-reward-weight",
        2.0,
    )
    assert status == 0, err
    assert all(word.startswith("w") for word in out.split())

    status, _, err = run_cli(
        capsys,
        "train",
        tmp_path / "otter",
        "--dataset",
        tmp_path / "labels.jsonl",
        "--output-dir",
        tmp_path / "value",
        "--beta",
        0.5,
    )
    assert status == 2 and "--beta sets the token-reward objective's beta" in err


@pytest.mark.slow
def test_bench_prints_and_writes_the_overhead_report(capsys, base_folder, tmp_path):
    status, out, err = run_cli(
        capsys,
        "bench",
        "--base",
        base_folder,
        "--repeats",
        1,
        "--prefill-tokens",
        8,
        "--decode-steps",
        2,
        "--inserted-hidden-size",
        8,
        "--output",
        tmp_path / "overhead.json",
    )
    assert status == 0, err
    report = json.loads(out)
    assert report == json.loads((tmp_path / "overhead.json").read_text())
    assert report["insertion"]["inserted_hidden_size"] == 8
    assert report["same_size_base"]["parameters"] > report["base_parameters"]
    for measurement in ("prefill_8_tokens", "decode_per_token_batch_1", "decode_per_token_batch_8", "peak_memory"):
        ratios = report[measurement]
        assert ratios["ratio"] > 0 and ratios["ratio_to_same_size"] > 0, measurement
    timings = report["decode_per_token_batch_8"]
    # The seconds are printed to 4 significant digits, the ratios come from the unrounded medians.
    assert timings["ratio"] == pytest.approx(timings["otter_seconds"] / timings["base_seconds"], rel=2e-3)
    assert timings["ratio_to_same_size"] == pytest.approx(
        timings["otter_seconds"] / timings["same_size_seconds"], rel=2e-3
    )


def test_bench_takes_a_base_or_a_real_shaped_one_not_both(capsys, base_folder):
    status, _, err = run_cli(capsys, "bench", "--base", base_folder, "--real-shaped", "qwen3")
    assert status == 2 and err == "otter-hf: error: Pass --base or --real-shaped, not both.\n"


# -- output folders: refused when not empty, replaced as a unit with --overwrite -----------------------------------


def _names(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("command", ["insert", "train"])
def test_commands_refuse_a_non_empty_output_folder(capsys, base_folder, tmp_path, command):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    argv = {
        "insert": ["insert", "--base", base_folder, "-o", output],
        "train": ["train", base_folder, "--dataset", tmp_path / "missing.jsonl", "--output-dir", output],
    }[command]
    status, _, err = run_cli(capsys, *argv)
    assert status == 2
    option = "--output" if command == "insert" else "--output-dir"
    assert (
        err == f"otter-hf: error: {option}: {output} is not empty; "
        "pass --overwrite to replace its contents, or choose a new folder.\n"
    )
    assert _names(output) == ["notes.txt"]


def test_insert_overwrite_leaves_nothing_of_the_previous_model(capsys, base_folder, tmp_path):
    # The case: a model without a tokenizer saved over one with a tokenizer and training results.
    bare_base = tmp_path / "bare-base"
    make_base("llama-mha-untied").save_pretrained(bare_base)
    output = tmp_path / "otter"
    run_cli(capsys, "insert", "--base", base_folder, "-o", output)
    (output / "all_results.json").write_text("{}")
    assert "tokenizer.json" in _names(output)

    status, _, err = run_cli(capsys, "insert", "--base", bare_base, "-o", output, "--overwrite")
    assert status == 0, err
    assert not any(name.startswith(("tokenizer", "all_results")) for name in _names(output))
    assert AutoModelForCausalLM.from_pretrained(output).config.hidden_size == 48
    status, _, err = run_cli(capsys, "generate", output, "--prompt", "w5 w6")
    assert status == 2 and err.splitlines()[-1] == (
        f"otter-hf: error: No tokenizer found with {output} or its base model; pass one with --tokenizer."
    )


def test_an_interrupted_insert_overwrite_leaves_the_previous_folder(capsys, monkeypatch, base_folder, tmp_path):
    output = tmp_path / "otter"
    run_cli(capsys, "insert", "--base", base_folder, "-o", output, "--inserted-hidden-size", 8)
    before = {name: (output / name).read_bytes() for name in _names(output)}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # The model is written, then Ctrl-C while the tokenizer is being saved beside it.
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupt)
    status, _, err = run_cli(capsys, "insert", "--base", base_folder, "-o", output, "--overwrite")
    assert status == 130 and err.splitlines()[-1] == "otter-hf: interrupted"
    assert {name: (output / name).read_bytes() for name in _names(output)} == before


def test_a_failed_first_train_leaves_no_output_folder(capsys, base_folder, tmp_path):
    run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "otter")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "w5 w6"}) + "\n")
    status, _, err = run_cli(
        capsys,
        "train",
        tmp_path / "otter",
        "--dataset",
        tmp_path / "rows.jsonl",
        "--objective",
        "value",
        "--output-dir",
        tmp_path / "trained",
    )
    assert status == 2 and "has no `completion`, `label` column" in err
    assert not (tmp_path / "trained").exists()


# -- every failure: one line naming the file or option and the fix, status 2 ------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_failures_are_one_line_naming_the_file_or_option(capsys, monkeypatch, base_folder, tmp_path):
    from huggingface_hub.errors import HTTPError

    run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "otter")
    shutil.copytree(tmp_path / "otter", tmp_path / "truncated")
    _truncate(tmp_path / "truncated" / "model.safetensors")
    (tmp_path / "broken.jsonl").write_text('{"chosen": "w5", "rejected": "w6"}\n{"chosen": "w5", "rej\n')
    (tmp_path / "other-columns.jsonl").write_text(json.dumps({"question": "w5", "answer": "w6"}) + "\n")

    class OfflineHfApi:
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, *args, **kwargs):
            # What huggingface_hub raises without a network: its HTTP library's ConnectError, no OSError.
            raise type("ConnectError", (HTTPError,), {})("[Errno -2] Name or service not known")

    monkeypatch.setattr("otter_hf.lifecycle.hub.HfApi", OfflineHfApi)
    cases = [
        (
            ["generate", tmp_path / "truncated", "--prompt", "w5"],
            f"{tmp_path / 'truncated' / 'model.safetensors'} cannot be read",
        ),
        (
            ["train", tmp_path / "otter", "--dataset", tmp_path / "broken.jsonl", "--output-dir", tmp_path / "out"],
            f"--dataset: {tmp_path / 'broken.jsonl'} cannot be read as a .jsonl file",
        ),
        (
            [
                "train",
                tmp_path / "otter",
                "--dataset",
                tmp_path / "other-columns.jsonl",
                "--output-dir",
                tmp_path / "out",
            ],
            "Reward training takes `chosen` and `rejected`",
        ),
        (["push", tmp_path / "otter", "user/otter"], "cannot reach the Hugging Face Hub"),
        (["generate", tmp_path / "otter", "--prompt", ""], "--prompt: the prompt is empty"),
        (
            ["generate", tmp_path / "otter", "--prompt", "w5 w150", "--tokenizer", tmp_path / "big-tokenizer"],
            "beyond the model's vocabulary of 96",
        ),
        (["generate", tmp_path / "otter", "--prompt", "w5", "--threads", 0], "--threads must be from 1 to 4096, got 0"),
    ]
    big_vocabulary = {f"w{index}": index for index in range(200)}
    backend = Tokenizer(WordLevel(big_vocabulary, unk_token="w3"))
    backend.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "big-tokenizer")
    for argv, message in cases:
        status, _, err = run_cli(capsys, *argv)
        lines = [line for line in err.splitlines() if line.startswith("otter-hf:")]
        assert status == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("otter-hf: error: ") and message in lines[0], (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- help, datasets, threads, bench noise ------------------------------------------------------------------------


def test_help_shows_defaults_and_the_bundled_dataset(capsys):
    _, out, _ = run_cli(capsys, "generate", "--help")
    assert "weight of the reward (default: 1.5)" in out and "seed for sampling (default: 0)" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    _, out, _ = run_cli(capsys, "--help")
    assert f"--dataset {PREFERENCES_PATH}" in out and os.path.isfile(PREFERENCES_PATH)
    _, out, _ = run_cli(capsys, "train", "--help")
    assert f"{PREFERENCES_PATH}, holds `train` and `test` rows" in " ".join(out.split())


def test_a_split_column_picks_the_rows_of_the_split(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": f"w{index}"}) + "\n" for index in range(3)))
    assert len(load_dataset_file(str(tmp_path / "rows.jsonl"), "test", "--dataset")) == 3  # no `split` column: all rows

    train, test = (
        load_dataset_file(str(PREFERENCES_PATH), "train", "--dataset"),
        load_dataset_file(str(PREFERENCES_PATH), "test", "--eval-dataset"),
    )
    assert (len(train), len(test)) == (276, 69)
    assert "split" not in train.column_names
    held_out_prompts = {row["prompt"][0]["content"] for row in test}
    assert not held_out_prompts & {row["prompt"][0]["content"] for row in train}
    with pytest.raises(
        ValueError,
        match=r"--dataset: .* has no rows of split 'validation'; its `split` column holds \['test', 'train'\]",
    ):
        load_dataset_file(str(PREFERENCES_PATH), "validation", "--dataset")


def test_insert_takes_threads_and_counts_in_words(capsys, base_folder, tmp_path):
    threads = torch.get_num_threads()
    try:
        status, out, err = run_cli(capsys, "insert", "--base", base_folder, "-o", tmp_path / "otter", "--threads", 1)
        assert status == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert "1 head (1 key/value)" in out and "1 heads" not in out


@pytest.mark.parametrize("command", ["insert", "train", "generate", "bench"])
def test_long_running_commands_take_threads(capsys, command):
    _, out, _ = run_cli(capsys, command, "--help")
    assert "--threads THREADS" in out
    if command != "bench":
        assert "fewer threads can be several times faster" in " ".join(out.split())


def test_bench_flags_timings_whose_repeats_disagree(capsys, monkeypatch, tmp_path):
    steady = summarize_timings({"base": [1.0, 1.01, 0.99, 1.0, 1.02], "otter": [1.1, 1.12, 1.09, 1.1, 1.11]})
    noisy = summarize_timings({"base": [1.0, 0.2, 3.0, 1.1, 0.4], "otter": [0.2, 0.21, 0.2, 0.2, 0.22]})
    assert not is_noisy(steady) and is_noisy(noisy)
    assert noisy["base_spread"] > 1

    report = {
        "prefill_512_tokens": steady,
        "decode_per_token_batch_1": noisy,
        "noisy_timings": ["decode_per_token_batch_1"],
    }
    monkeypatch.setattr("otter_hf.overhead.measure_overhead", lambda *args, **kwargs: report)
    status, out, err = run_cli(capsys, "bench", "--base", tmp_path, "--output", tmp_path / "overhead.json")
    assert status == 0
    assert json.loads(out) == json.loads((tmp_path / "overhead.json").read_text()) == report
    assert err.startswith("otter-hf: warning: the repeats of decode_per_token_batch_1 spread by more than 25%")
