"""What an Otter model costs over its base model: parameters, forward time and peak memory.

Three models are measured: the base, the Otter model inserted into it (sharing the base tensors), and the
same-size base (`same_size_base`: the base grown inside its layers by as many parameters as Otter inserts). Otter
over the base is what a user pays; Otter over the same-size base is what Otter's design costs beyond the weights
it adds. Timings run the three alternately in one process and report medians. Peak memory is the peak resident
set size (`otter_hf.memory`, reset after loading) of a fresh child process per model running the same workload.
"""

import copy
import gc
import json
import math
import multiprocessing
import os
import re
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from safetensors.torch import save_model
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.utils import SAFE_WEIGHTS_NAME

from .lifecycle import insert
from .memory import peak_resident_bytes, reset_peak_resident_bytes
from .modeling import is_inserted_parameter

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
    # Gated DeltaNet hybrid: Qwen3.5's layer pattern (three linear-attention layers to one full-attention layer, cut
    # at the sixth) and head sizes (the config class's defaults: gated full-attention heads 256 wide, rotated on a
    # quarter; linear-attention key and value heads 128 wide, twice as many value heads as key heads), at
    # Qwen3-0.6B's width with half the config's head counts.
    "qwen3_5_text": (
        "a Qwen3.5-style hybrid 1024 wide",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=256,
            linear_num_key_heads=8,
            linear_num_value_heads=16,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            tie_word_embeddings=True,
        ),
    ),
    "gpt2": (
        "GPT-2 (124M)",
        dict(hidden_size=768, n_inner=3072, num_attention_heads=12, tie_word_embeddings=True),
    ),
    # A mixture of experts: each token runs through 8 experts as in the real model, chosen among 16 rather than 128
    # so that the random weights fit in memory (2.8 GB in float32).
    "qwen3_moe": (
        "Qwen3-30B-A3B",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=16,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            tie_word_embeddings=False,
        ),
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


def _load(path, dtype, config=None):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, config=config).eval()


# The attribute holding the width of each layer's feed-forward block, where it is not `intermediate_size`.
_FEED_FORWARD_WIDTH = {"gpt2": "n_inner"}
_LAYER_INDEX = re.compile(r"\.\d+\.")


def _parameter_count(config) -> int:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).num_parameters()


def active_base_parameters(otter) -> int:
    """The base parameters one token runs through: all of them in a dense model; in a mixture of experts all but
    the routed experts it is not sent to (each sparse block's fused experts count for `num_experts_per_tok` of
    their number; routers and shared experts run for every token)."""
    sparse = otter.base_model.otter_layout.sparse_mlp
    total = otter.num_base_parameters()
    if sparse is None:
        return total
    skipped = 0
    for layer in otter.otter_decoder_layers():
        block = layer.get_submodule(sparse.path)
        if isinstance(block, sparse.block_class):
            experts = block.experts
            num_experts = experts.gate_up_proj.shape[0]
            unused_share = 1 - otter.config.num_experts_per_tok / num_experts
            skipped += round(sum(parameter.numel() for parameter in experts.parameters()) * unused_share)
    return total - skipped


def same_size_base(base, otter):
    """The base model grown inside its layers by as many parameters as `otter` inserts into them: what the inserted
    parameters cost as plain base weights, with no second stream, so that Otter's timings over this model's are
    what its design costs beyond the weights it adds.

    Each layer gets Otter's inserted key-value heads (query heads rounded up to a multiple of the key-value heads,
    as grouped attention needs), and feed-forward units make up the rest of the inserted parameter count; a base
    without key-value heads in its config (GPT-2) grows by feed-forward units alone. The base weights fill the
    leading rows and columns and random values the rest: the model is for timing and memory, not for its outputs.
    """
    if otter.base_model.otter_layout.sparse_mlp is not None:
        raise ValueError(
            f"A same-size base of a mixture of experts ({base.config.model_type}) would have to choose between its "
            "total and its active parameters; it is built for dense bases only."
        )
    config = copy.deepcopy(base.config)
    num_layers = config.num_hidden_layers
    inserted_per_layer = (
        sum(
            parameter.numel()
            for name, parameter in otter.named_parameters()
            if is_inserted_parameter(name) and _LAYER_INDEX.search(name)
        )
        // num_layers
    )
    base_count = _parameter_count(config)
    if getattr(config, "num_key_value_heads", None) is not None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        key_value_heads = config.num_key_value_heads + otter.config.inserted_num_key_value_heads
        query_heads = config.num_attention_heads + otter.config.inserted_num_attention_heads
        config.num_attention_heads = math.ceil(query_heads / key_value_heads) * key_value_heads
        config.num_key_value_heads, config.head_dim = key_value_heads, head_dim
    width_attribute = _FEED_FORWARD_WIDTH.get(config.model_type, "intermediate_size")
    width = getattr(config, width_attribute) or 4 * config.hidden_size  # GPT-2's default when n_inner is None
    setattr(config, width_attribute, width)
    heads_grown_count = _parameter_count(config)
    setattr(config, width_attribute, width + 1)
    parameters_per_unit = (_parameter_count(config) - heads_grown_count) // num_layers
    attention_growth = (heads_grown_count - base_count) // num_layers
    setattr(config, width_attribute, width + round((inserted_per_layer - attention_growth) / parameters_per_unit))

    torch.manual_seed(0)
    grown = AutoModelForCausalLM.from_config(config, dtype=base.dtype).eval()
    grown_state = grown.state_dict()
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            grown_state[name][tuple(slice(0, size) for size in tensor.shape)].copy_(tensor)
    return grown


def _peak_memory_worker(model_path, config, dtype, with_otter, insertion_options, prefill_tokens, decode_steps) -> int:
    torch.set_num_threads(1)
    model = _load(model_path, dtype, config)
    if with_otter:
        model = insert(model, **insertion_options).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), generator=generator)
    gc.collect()
    reset_peak_resident_bytes()  # loading peaks far above inference: measure the workload alone
    decode_step_times(model, input_ids, decode_steps)
    return peak_resident_bytes()


def _peak_memory(model_path, dtype, with_otter, insertion_options, prefill_tokens, decode_steps, config=None) -> int:
    """Peak resident bytes of a fresh process that loads the model at `model_path` (with `config` if given, and
    with Otter inserted into it if `with_otter`), prefills `prefill_tokens` tokens and decodes `decode_steps` more."""
    # A pool of one process, so that an error in the child is raised here instead of leaving the parent waiting.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(
            _peak_memory_worker,
            model_path,
            config,
            dtype,
            with_otter,
            insertion_options,
            prefill_tokens,
            decode_steps,
        ).result()


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
    """Measure the Otter/base and Otter/same-size-base cost ratios for the base model at `base_path` (a local path
    or Hub id); `insertion_options` go to `otter_hf.insert`."""
    torch.set_num_threads(threads)
    base = _load(base_path, dtype)
    otter = insert(base, **insertion_options).eval()
    # A mixture of experts has no same-size base (see `same_size_base`): Otter is timed against the base alone.
    sparse = otter.base_model.otter_layout.sparse_mlp is not None
    same_size = None if sparse else same_size_base(base, otter)
    models = {"base": base, "same_size": same_size, "otter": otter}
    models = {name: model for name, model in models.items() if model is not None}
    generator = torch.Generator().manual_seed(0)
    vocab_size = base.config.vocab_size
    prefill_ids = torch.randint(0, vocab_size, (1, prefill_tokens), generator=generator)
    decode_ids = {
        batch: torch.randint(0, vocab_size, (batch, decode_prompt_tokens), generator=generator)
        for batch in decode_batch_sizes
    }

    prefill_times = {name: [] for name in models}
    decode_times = {batch: {name: [] for name in models} for batch in decode_batch_sizes}
    for model in models.values():
        prefill(model, prefill_ids)  # warm-up
    for _ in tqdm(range(repeats), desc=f"Timing {', '.join(models)}"):
        # Alternating the models spreads any drift of the machine over all of them.
        for name, model in models.items():
            start = time.perf_counter()
            prefill(model, prefill_ids)
            prefill_times[name].append(time.perf_counter() - start)
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
    with tempfile.TemporaryDirectory() as scratch:
        peaks = {"base": _peak_memory(base_path, dtype, False, insertion_options, **memory_workload)}
        if same_size is not None:
            # The same-size base is loaded from a checkpoint as the base is, so that loading leaves the same traces.
            # Its query heads need not divide the hidden size, which save_pretrained and a config reload refuse: its
            # weights are written by safetensors (and its generation config, which loading reads) and its config
            # goes to the child process as an object.
            save_model(same_size, os.path.join(scratch, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
            same_size.generation_config.save_pretrained(scratch)
            peaks["same_size"] = _peak_memory(scratch, dtype, False, {}, **memory_workload, config=same_size.config)
        peaks["otter"] = _peak_memory(base_path, dtype, True, insertion_options, **memory_workload)
    config = otter.config
    active_parameters = active_base_parameters(otter)
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
        # Per token: a mixture of experts runs only some of its base parameters, and all the inserted ones.
        "active_base_parameters": active_parameters,
        "inserted_parameter_fraction_of_active": round(otter.num_inserted_parameters() / active_parameters, 4),
        "same_size_base": None if same_size is None else _same_size_summary(same_size),
        **timings,
        "noisy_timings": [name for name, summary in timings.items() if is_noisy(summary)],
        "peak_memory": {
            "workload": f"prefill {prefill_tokens} tokens + {decode_steps} decoded tokens, batch 1, "
            "one fresh process each",
            **{f"{name}_bytes": peak for name, peak in peaks.items()},
            **_ratios(peaks),
        },
    }


def _same_size_summary(same_size) -> dict:
    config = same_size.config
    return {
        "parameters": same_size.num_parameters(),
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "feed_forward_width": getattr(config, _FEED_FORWARD_WIDTH.get(config.model_type, "intermediate_size")),
    }


def _ratios(values: dict[str, float]) -> dict:
    """Otter's value over the base's (`ratio`) and over the same-size base's, when that was measured."""
    ratios = {"ratio": round(values["otter"] / values["base"], 3)}
    if "same_size" in values:
        ratios["ratio_to_same_size"] = round(values["otter"] / values["same_size"], 3)
    return ratios


def summarize_timings(times: dict[str, list[float]]) -> dict:
    """Median seconds of each model's runs (`base`, `otter`, and `same_size` when timed), Otter's ratios to the
    others, and how far each model's repeats spread."""
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    return {
        **{f"{name}_seconds": float(f"{median:.4g}") for name, median in medians.items()},
        **_ratios(medians),
        **{f"{name}_spread": _relative_spread(runs) for name, runs in times.items()},
    }


def _relative_spread(times: list[float]) -> float | None:
    """Interquartile range over median; None for a single run, whose noise cannot be told."""
    if len(times) < 2:
        return None
    lower, _, upper = statistics.quantiles(times, n=4)
    return round((upper - lower) / statistics.median(times), 3)


def is_noisy(summary: dict) -> bool:
    return any(
        spread is not None and spread > NOISY_SPREAD for key, spread in summary.items() if key.endswith("_spread")
    )


def format_report(report: dict) -> str:
    return json.dumps(report, indent=2)
