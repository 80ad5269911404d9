"""What an Otter model costs over its base model: parameters, forward time and peak memory.

Timings run base and Otter alternately in one process, on the same weights (the Otter model shares the
base tensors), and report medians. Peak memory is the peak resident set size (Linux VmHWM, reset after loading)
of two fresh child processes that run the same workload, one with the base model and one with the Otter model.
"""

import gc
import json
import multiprocessing
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from .lifecycle import insert

# Bases for architectures without a small checkpoint on this machine: the layer shapes of the smallest released
# model of the architecture (hidden size, heads, head size, FFN width, layer pattern), with fewer layers and a
# smaller vocabulary so that a run takes a minute or two on 2 CPU cores. The weights are random, which changes
# no timing; the ratios show what the inserted heads and units cost beside layers of the real width.
REAL_SHAPED_LAYERS = 6
REAL_SHAPED_VOCAB_SIZE = 32_768
REAL_SHAPED_BASES = {
    "qwen3": (
        "Qwen3-0.6B",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3_text": (
        "Gemma-3-270M",
        dict(
            hidden_size=640,
            intermediate_size=2048,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            tie_word_embeddings=True,
            # five sliding-window layers to one global layer, as in Gemma 3
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
        ),
    ),
    "gpt2": (
        "GPT-2 (124M)",
        dict(hidden_size=768, n_inner=3072, num_attention_heads=12, tie_word_embeddings=True),
    ),
}


def save_real_shaped_base(model_type: str, directory: str) -> str:
    """Save a random-weight base of `model_type` shaped as `REAL_SHAPED_BASES` says; returns `directory`."""
    if model_type not in REAL_SHAPED_BASES:
        raise ValueError(f"No real-shaped base for {model_type!r}; choose one of {sorted(REAL_SHAPED_BASES)}.")
    _, sizes = REAL_SHAPED_BASES[model_type]
    config = AutoConfig.for_model(
        model_type, num_hidden_layers=REAL_SHAPED_LAYERS, vocab_size=REAL_SHAPED_VOCAB_SIZE, **sizes
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


# Timings whose repeats spread (interquartile range) by more than this fraction of their median are too noisy to
# trust: the machine was doing other work.
NOISY_SPREAD = 0.25


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@torch.no_grad()
def prefill(model, input_ids):
    """The prompt's forward as generate() runs it: a fresh cache filled, the logits of the last position only."""
    return model(input_ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)


@torch.no_grad()
def decode_step_times(model, input_ids, steps: int) -> list[float]:
    """Seconds of each of `steps` greedy one-token forwards after the prompt's."""
    output = prefill(model, input_ids)
    cache, times = output.past_key_values, []
    for _ in range(steps):
        next_tokens = output.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        output = model(next_tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return times


def _load(base_path, dtype):
    return AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).eval()


def _peak_resident_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        peak_kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(peak_kib) * 1024


def _peak_memory_worker(base_path, dtype, with_otter, insertion_options, prefill_tokens, decode_steps, queue):
    torch.set_num_threads(1)
    model = _load(base_path, dtype)
    if with_otter:
        model = insert(model, **insertion_options).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), generator=generator)
    # Loading peaks far above inference (the checkpoint is read and copied): reset the high-water mark so
    # the peak measured is that of the model at work, weights, activations and cache included.
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")
    decode_step_times(model, input_ids, decode_steps)
    queue.put(_peak_resident_bytes())


def _peak_memory(base_path, dtype, with_otter, insertion_options, prefill_tokens, decode_steps) -> int:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_peak_memory_worker,
        args=(base_path, dtype, with_otter, insertion_options, prefill_tokens, decode_steps, queue),
    )
    process.start()
    peak = queue.get()
    process.join()
    return peak


def measure_overhead(
    base_path: str,
    *,
    prefill_tokens: int = 512,
    decode_prompt_tokens: int = 128,
    decode_steps: int = 32,
    decode_batch_sizes: tuple[int, ...] = (1, 8),
    repeats: int = 5,
    threads: int = 2,
    dtype: torch.dtype = torch.float32,
    **insertion_options,
) -> dict:
    """Measure the Otter/base cost ratios for the base model at `base_path` (a local path or Hub id)."""
    torch.set_num_threads(threads)
    base = _load(base_path, dtype)
    otter = insert(base, **insertion_options).eval()
    generator = torch.Generator().manual_seed(0)
    vocab_size = base.config.vocab_size
    prefill_ids = torch.randint(0, vocab_size, (1, prefill_tokens), generator=generator)
    decode_ids = {
        batch: torch.randint(0, vocab_size, (batch, decode_prompt_tokens), generator=generator)
        for batch in decode_batch_sizes
    }

    prefill_times = {"base": [], "otter": []}
    decode_times = {batch: {"base": [], "otter": []} for batch in decode_batch_sizes}
    prefill(base, prefill_ids), prefill(otter, prefill_ids)  # warm-up
    for _ in tqdm(range(repeats), desc="Timing base and Otter"):
        # Alternating the two models spreads any drift of the machine over both.
        for name, model in (("base", base), ("otter", otter)):
            prefill_times[name].append(_timed(lambda: prefill(model, prefill_ids)))
            for batch, input_ids in decode_ids.items():
                decode_times[batch][name].extend(decode_step_times(model, input_ids, decode_steps))

    timings = {
        f"prefill_{prefill_tokens}_tokens": summarize_timings(prefill_times),
        **{
            f"decode_per_token_batch_{batch}": {
                **summarize_timings(times),
                "prompt_tokens": decode_prompt_tokens,
                "steps": decode_steps,
            }
            for batch, times in decode_times.items()
        },
    }
    memory_workload = dict(prefill_tokens=prefill_tokens, decode_steps=decode_steps)
    base_peak = _peak_memory(base_path, dtype, False, insertion_options, **memory_workload)
    otter_peak = _peak_memory(base_path, dtype, True, insertion_options, **memory_workload)
    config = otter.config
    return {
        "base_model": base_path,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "repeats": repeats,
        "insertion": {
            "inserted_hidden_size": config.inserted_hidden_size,
            "inserted_num_attention_heads": config.inserted_num_attention_heads,
            "inserted_num_key_value_heads": config.inserted_num_key_value_heads,
            "inserted_intermediate_size": config.inserted_intermediate_size,
        },
        "base_parameters": otter.num_base_parameters(),
        "inserted_parameters": otter.num_inserted_parameters(),
        "inserted_parameter_fraction": round(otter.inserted_parameter_fraction(), 4),
        **timings,
        "noisy_timings": [name for name, summary in timings.items() if is_noisy(summary)],
        "peak_memory": {
            "workload": f"prefill {prefill_tokens} tokens + {decode_steps} decoded tokens, batch 1, one fresh process each",
            "base_bytes": base_peak,
            "otter_bytes": otter_peak,
            "ratio": round(otter_peak / base_peak, 3),
        },
    }


def summarize_timings(times: dict[str, list[float]]) -> dict:
    """Median seconds of the base and Otter runs, their ratio, and how far each one's repeats spread."""
    base_median, otter_median = statistics.median(times["base"]), statistics.median(times["otter"])
    return {
        "base_seconds": round(base_median, 5),
        "otter_seconds": round(otter_median, 5),
        "ratio": round(otter_median / base_median, 3),
        "base_spread": _relative_spread(times["base"]),
        "otter_spread": _relative_spread(times["otter"]),
    }


def _relative_spread(times: list[float]) -> float | None:
    """Interquartile range over median; None for a single run, whose noise cannot be told."""
    if len(times) < 2:
        return None
    lower, _, upper = statistics.quantiles(times, n=4)
    return round((upper - lower) / statistics.median(times), 3)


def is_noisy(summary: dict) -> bool:
    return any(
        spread is not None and spread > NOISY_SPREAD for spread in (summary["base_spread"], summary["otter_spread"])
    )


def format_report(report: dict) -> str:
    return json.dumps(report, indent=2)
