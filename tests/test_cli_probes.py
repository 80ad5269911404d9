"""The command line's promise under hostile or careless invocations: one `otter-hf: error:` line and exit status 2,
never a traceback, never exit 0 with nothing produced, and no option silently ignored."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from otter_hf.cli import main
from tests.helpers import make_base, make_tokenizer, run_cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny base model with its tokenizer, and Otter checkpoints inserted into it (full and inserted-only)."""
    root = tmp_path_factory.mktemp("cli_probes")
    make_base("llama-gqa-tied").save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    assert main(["insert", "--base", str(root / "base"), "-o", str(root / "otter"), "--token-reward-head"]) == 0
    assert main(["insert", "--base", str(root / "base"), "-o", str(root / "inserted"), "--otter-only"]) == 0
    return root


def one_error_line(capsys, *argv, message: str) -> None:
    status, out, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("otter-hf:")]
    assert status == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("otter-hf: error: "), (argv, err)
    assert message in lines[0], (argv, lines[0])
    assert "Traceback" not in err and not out.strip()


def generate(folders, *options):
    return ["generate", folders / "otter", "--prompt", "w5 w6", "--max-new-tokens", 8, *options]


def test_huge_epochs_are_refused(capsys, folders, tmp_path):
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text(json.dumps({"chosen": "w5", "rejected": "w6"}) + "\n")
    one_error_line(
        capsys,
        *("train", folders / "otter", "--dataset", dataset, "--output-dir", tmp_path / "out", "--epochs", "1e308"),
        message="--epochs must be a positive number up to 1e+06, got 1e+308.",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_a_million_threads_are_refused(capsys, folders, command):
    argv = generate(folders) if command == "generate" else ["bench", "--base", folders / "base"]
    one_error_line(capsys, *argv, "--threads", 1_000_000, message="--threads must be from 1 to 4096, got 1000000.")


def test_a_vanishing_temperature_is_refused(capsys, folders):
    one_error_line(
        capsys,
        *generate(folders, "--do-sample", "--temperature", "1e-300"),
        message="--temperature must be from 0.01 to 100, got 1e-300.",
    )


@pytest.mark.parametrize("option", ["--reward-weight", "--token-reward-weight"])
def test_sampling_with_a_huge_weight_is_refused_rather_than_printing_nothing(capsys, folders, option):
    one_error_line(
        capsys,
        *generate(folders, "--do-sample", option, "1e308"),
        message=f"`{option}` must be a finite number, got 1e+308; its magnitude must be at most",
    )


def test_a_crafted_dtype_in_the_config_is_refused(capsys, folders, tmp_path):
    crafted = tmp_path / "crafted"
    shutil.copytree(folders / "otter", crafted)
    config = json.loads((crafted / "config.json").read_text())
    for dtype in ("float33", 5, ["x"], {"not": "a dtype"}, "int8"):
        config["dtype"] = dtype
        (crafted / "config.json").write_text(json.dumps(config))
        one_error_line(
            capsys,
            "generate",
            crafted,
            "--prompt",
            "w5",
            message=f'`dtype` must be a floating-point torch dtype such as "float32" or "bfloat16", got {dtype!r}',
        )


def test_an_otter_config_that_is_a_json_list_is_refused(capsys, folders, tmp_path):
    crafted = tmp_path / "crafted"
    shutil.copytree(folders / "inserted", crafted)
    (crafted / "otter_config.json").write_text("[1, 2, 3]")
    one_error_line(
        capsys,
        *("generate", crafted, "--otter-only", "--prompt", "w5"),
        message="otter_config.json holds a JSON list, not the object of config fields",
    )


def test_a_draft_head_bomb_in_the_config_is_refused_before_allocation(capsys, folders, tmp_path):
    crafted = tmp_path / "crafted"
    shutil.copytree(folders / "otter", crafted)
    config = json.loads((crafted / "config.json").read_text())
    config["num_draft_heads"] = 1_000_000
    (crafted / "config.json").write_text(json.dumps(config))
    one_error_line(
        capsys,
        *("generate", crafted, "--prompt", "w5"),
        message="`num_draft_heads` must be an integer from 0 to 64, got 1000000.",
    )


def test_ctrl_c_during_the_start_up_imports_is_one_line(tmp_path):
    """KeyboardInterrupt while `otter-hf` imports transformers (Ctrl-C at start-up): status 130, one line."""
    code = (
        "import builtins, sys\n"
        "real_import = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'transformers':\n"
        "        raise KeyboardInterrupt\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "from otter_hf_cli import main\n"
        "sys.exit(main(['--help']))\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 130, result.stderr[-2000:]
    # Lines other than otter-hf's own come from packages imported before transformers (torchao, bitsandbytes).
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("otter-hf")] == ["otter-hf: interrupted"]


def test_an_empty_generation_is_an_error_not_a_silent_success(capsys, folders, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "decode", lambda self, *args, **kwargs: "")
    one_error_line(capsys, *generate(folders), message="the model generated no text")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--temperature", "0.7"], "--temperature sets sampling, which is off: add --do-sample"),
        (["--reward-weight", "2", "--token-reward-weight", "1"], "--reward-weight set ARGS guidance"),
        (["--top-k", "5", "--token-reward-weight", "1"], "--top-k set ARGS guidance"),
    ],
    ids=["temperature-without-sampling", "both-weights", "top-k-with-token-weight"],
)
def test_options_that_would_be_ignored_are_refused(capsys, folders, options, message):
    one_error_line(capsys, *generate(folders, *options), message=message)


def test_the_guidance_options_work_alone(capsys, folders):
    for options in (["--token-reward-weight", "1"], ["--reward-weight", "2", "--top-k", "3", "--do-sample"]):
        status, out, err = run_cli(capsys, *generate(folders, *options))
        # Accepted and run: text, or (the tiny random model may emit only ids its tokenizer has no text for) the
        # error that says so, never a refusal of the options themselves.
        assert (status == 0 and out.strip()) or "the model generated no text" in err, err
