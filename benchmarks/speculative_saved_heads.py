"""Speculative decoding with draft heads that `benchmarks/speculative.py` trained and saved, against plain greedy.

Loads saved Otter draft heads (`save_otter` output, with their `draft_confidence_threshold`) and times
`generate(custom_generate=speculative_generate)` against the base model's plain greedy `generate()` on the same
held-out HH-RLHF prompts as that benchmark, at batch 1 and 4: the median over batches of greedy's time over
speculative's, the mean tokens accepted per step, and whether the tokens are identical. With `--recalibrate` it
first measures the drafter's step costs on this machine and calibrates the threshold again on the calibration
prompts (the cached self-distilled answers), as `benchmarks/speculative.py` does. Prints one JSON object and
writes it to `--output`.

    python benchmarks/speculative.py  # once, to train and save the heads
    python benchmarks/speculative_saved_heads.py [--recalibrate] \
        [--heads benchmarks/results/speculative/recurrent-draft-heads]
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from speculative import chat_texts, hh_first_turns, measured_step_costs, self_distilled
from transformers import AutoModelForCausalLM, AutoTokenizer

import otter_hf
from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.generation import calibrate_draft_confidence, speculative_generate
from otter_hf.generation.speculative import has_recurrent_draft_head, otter_drafts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--heads", default="benchmarks/results/speculative/recurrent-draft-heads", help="save_otter folder"
    )
    parser.add_argument(
        "--recalibrate", action="store_true", help="measure the step costs and calibrate the threshold again"
    )
    parser.add_argument("--cache-dir", default="benchmarks/results/speculative", help="as given to speculative.py")
    parser.add_argument("--calibration-prompts", type=int, default=24, help="as given to speculative.py")
    parser.add_argument("--held-out", type=int, default=24, help="as given to speculative.py")
    parser.add_argument("--eval-new-tokens", type=int, default=48)
    parser.add_argument("--distill-new-tokens", type=int, default=64, help="as given to speculative.py")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/speculative_saved_heads.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    otter = otter_hf.load_otter(base, args.heads).eval()
    test_prompts = hh_first_turns()["test"]
    prompts = test_prompts[args.calibration_prompts : args.calibration_prompts + args.held_out]
    result = {"heads": args.heads, "saved_draft_confidence_threshold": otter.config.draft_confidence_threshold}
    if args.recalibrate:
        calibration_dataset = self_distilled(
            base,
            tokenizer,
            test_prompts[: args.calibration_prompts],
            args.distill_new_tokens,
            Path(args.cache_dir) / "distilled-calibration.jsonl",
        )
        context_ids = torch.tensor([calibration_dataset[0]["input_ids"]])
        num_drafts = (
            otter.config.num_recurrent_drafts if has_recurrent_draft_head(otter) else otter.config.num_draft_heads
        )
        with otter.otter_disabled() if has_recurrent_draft_head(otter) else contextlib.nullcontext():
            costs = measured_step_costs(otter, otter_drafts(otter, 1.0), base, context_ids, num_drafts)
        calibration = calibrate_draft_confidence(
            otter, calibration_dataset, **{key: value for key, value in costs.items() if not key.endswith("_ms")}
        )
        otter.config.draft_confidence_threshold = calibration.threshold
        result["measured_step_costs"] = costs
        result["recalibrated"] = {
            "draft_confidence_threshold": calibration.threshold,
            "expected_speed_up": round(calibration.expected_speed_up, 3),
        }
    texts = chat_texts(tokenizer, prompts)
    generation = dict(do_sample=False, max_new_tokens=args.eval_new_tokens, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for batch_size in args.batch_sizes:
            speed_ups, identical, accepted = [], 0, []
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
                speculative = otter.generate(
                    **inputs, custom_generate=speculative_generate, return_dict_in_generate=True, **generation
                )
                speculative_seconds = time.perf_counter() - start
                speed_ups.append(greedy_seconds / speculative_seconds)
                identical += int(torch.equal(greedy, speculative.sequences))
                accepted += speculative.accepted_tokens_per_step
            result[f"batch_{batch_size}"] = {
                "speed_vs_greedy_median_per_batch": round(statistics.median(speed_ups), 3),
                "mean_accepted_tokens_per_step": round(statistics.mean(accepted), 3),
                "token_identical_batches": identical,
                "batches": len(batches),
            }
    result["command"] = "python " + " ".join(sys.argv)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
