"""What speculative decoding costs when its calibration switched drafting off, against plain greedy.

Loads the Otter draft heads that `benchmarks/speculative.py` trained and saved (with their calibrated
`draft_confidence_threshold`) and times `generate(custom_generate=speculative_generate)` against the base model's
plain greedy `generate()` on the same held-out HH-RLHF prompts as that benchmark, at batch 1 and 4: the median over
batches of greedy's time over speculative's, and whether the tokens are identical. Prints one JSON object.

    python benchmarks/speculative.py  # once, to train and save the heads
    python benchmarks/speculative_drafting_off.py
"""

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import otter_hf
from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.generation import speculative_generate
from speculative import chat_texts, hh_first_turns


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", default="benchmarks/results/speculative/otter-draft-heads", help="save_otter folder")
    parser.add_argument("--calibration-prompts", type=int, default=24, help="as given to speculative.py")
    parser.add_argument("--held-out", type=int, default=24, help="as given to speculative.py")
    parser.add_argument("--eval-new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    otter = otter_hf.load_otter(base, args.heads).eval()
    prompts = hh_first_turns()["test"][args.calibration_prompts : args.calibration_prompts + args.held_out]
    texts = chat_texts(tokenizer, prompts)
    generation = dict(do_sample=False, max_new_tokens=args.eval_new_tokens, pad_token_id=tokenizer.pad_token_id)
    result = {"draft_confidence_threshold": otter.config.draft_confidence_threshold}
    with torch.no_grad():
        for batch_size in args.batch_sizes:
            speed_ups, identical = [], 0
            batches = [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]
            for index, batch in enumerate(batches):
                inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
                if index == 0:  # warm-up, not timed
                    base.generate(**inputs, **generation)
                    otter.generate(**inputs, custom_generate=speculative_generate, **generation)
                start = time.perf_counter()
                greedy = base.generate(**inputs, **generation)
                greedy_seconds = time.perf_counter() - start
                start = time.perf_counter()
                speculative = otter.generate(**inputs, custom_generate=speculative_generate, **generation)
                speculative_seconds = time.perf_counter() - start
                speed_ups.append(greedy_seconds / speculative_seconds)
                identical += int(torch.equal(greedy, speculative))
            result[f"batch_{batch_size}"] = {
                "speed_vs_greedy_median_per_batch": round(statistics.median(speed_ups), 3),
                "token_identical_batches": identical,
                "batches": len(batches),
            }
    result["command"] = "python " + " ".join(sys.argv)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
