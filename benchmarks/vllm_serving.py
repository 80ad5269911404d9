"""Serving an Otter checkpoint with vLLM against serving its base model, and against transformers, printed as JSON.

    .venv-vllm/bin/python benchmarks/vllm_serving.py                     # SmolLM2-135M-Instruct, fp32, batch 1/8/32
    .venv-vllm/bin/python benchmarks/vllm_serving.py --repeats 5 --max-new-tokens 64 --hf-python python

Run it with vLLM's environment (see .ci/vllm). The checkpoints and the transformers side run in a subprocess of
the Python that has otter_hf (`--hf-python`), with this same file: `prepare` builds the base checkpoint (the
embedded SmolLM2-135M-Instruct), an Otter checkpoint inserted into it with a token-level reward head (its heads
untrained but not zero, so guidance changes tokens) and the prompts; `hf` times transformers' generate().

Generation, greedy, the same `--max-new-tokens` for every prompt (EOS blocked on both sides), output tokens/s:
  vllm_base          vLLM serving the base checkpoint;
  vllm_same_size_base  vLLM serving the base model grown, inside its own layers, by as many parameters and
                     key-value heads per layer as Otter inserts (`otter_hf.overhead.same_size_base`, as
                     `otter-hf bench` measures it in transformers; random values in the new rows): what the
                     inserted parameters cost when vLLM computes them natively, with no second stream. It is the
                     floor any Otter implementation is measured against, in the same run;
  vllm_otter         vLLM serving the Otter checkpoint (the inserted stream runs, no guidance);
  vllm_otter_guided  the same engine, every request with `extra_args={"token_reward_weight": w}`;
  hf_base, hf_otter, hf_otter_guided: transformers' generate() of the base model, the Otter model, and
                     `generate(token_reward_weight=w)`, one thread (vLLM's CPU worker computes on one core too).
A batch of b submits b prompts at once. The vLLM variants run round-robin in one process, every engine alive,
so a change of machine load hits them alike; a first untimed pass warms every shape up, and the median over
repeats is reported. `time_ratio_to_vllm_base` is the vLLM base's tokens/s over the variant's (1.10: 10%
slower); `vllm_time_ratio_by_repeat` gives each repeat's ratio, as the spread between repeats on a shared machine
is often wider than the differences between variants. `tokens_equal_*` compare the tokens of the warm-up pass:
the Otter engine against the base engine and against transformers, guided against guided.

Scoring: the sequence value (`classify`, last token) of `--score-sequences` prompts, vLLM's pooling runner
against the Otter model's forward in transformers (batches of 32), sequences/s.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKEN_REWARD_WEIGHT = 0.5


# -- the transformers side (run by --hf-python) ----------------------------------------------------------------


def prepare(work_dir: Path, prompt_tokens: int, num_prompts: int) -> None:
    """Base and Otter checkpoints of SmolLM2-135M-Instruct, and prompts of `prompt_tokens` tokens each."""
    import gzip

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import otter_hf
    from otter_hf.embedded_model import embedded_base_model_path
    from otter_hf.overhead import same_size_base

    base_path = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    base.save_pretrained(work_dir / "base")
    tokenizer.save_pretrained(work_dir / "base")
    torch.manual_seed(0)
    otter = otter_hf.insert(base, token_reward_head=True)
    with torch.no_grad():
        otter.token_reward_head.proj.weight.normal_(std=0.02)
    otter.save_pretrained(work_dir / "otter")
    tokenizer.save_pretrained(work_dir / "otter")
    same_size_base(base, otter).save_pretrained(work_dir / "same_size_base")
    tokenizer.save_pretrained(work_dir / "same_size_base")

    prompts = []
    data = Path(otter_hf.__file__).parent / "data" / "hh-harmless-dev.jsonl.gz"
    with gzip.open(data, "rt") as lines:
        for line in lines:
            ids = tokenizer(json.loads(line)["chosen"].strip())["input_ids"]
            if len(ids) >= prompt_tokens:
                prompts.append(ids[:prompt_tokens])
            if len(prompts) == num_prompts:
                break
    (work_dir / "prompts.json").write_text(json.dumps(prompts))


def time_hf(work_dir: Path, batch_sizes: list[int], new_tokens: int, repeats: int, score_sequences: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import otter_hf  # noqa: F401  (registers the Otter classes)

    torch.set_num_threads(1)
    prompts = json.loads((work_dir / "prompts.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(work_dir / "base", dtype=torch.float32).eval()
    otter = AutoModelForCausalLM.from_pretrained(work_dir / "otter", dtype=torch.float32).eval()
    greedy = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    # Every prompt has the same length, so the attention mask is all ones (SmolLM2 pads with EOS: say so).
    variants = {
        "hf_base": lambda ids: base.generate(ids, attention_mask=torch.ones_like(ids), **greedy),
        "hf_otter": lambda ids: otter.generate(ids, attention_mask=torch.ones_like(ids), **greedy),
        "hf_otter_guided": lambda ids: otter.generate(
            ids, attention_mask=torch.ones_like(ids), token_reward_weight=TOKEN_REWARD_WEIGHT, **greedy
        ),
    }
    seconds = {(name, batch): [] for name in variants for batch in batch_sizes}
    tokens = {}
    with torch.no_grad():
        # Pass 0 warms every shape up and gives the tokens; passes 1..repeats are timed.
        for repeat in range(repeats + 1):
            for batch in batch_sizes:
                input_ids = torch.tensor(prompts[:batch])  # prompts of one length: no padding
                for name, generate in variants.items():
                    start = time.perf_counter()
                    output = generate(input_ids)
                    if repeat == 0:
                        tokens[f"{name}/{batch}"] = output[:, input_ids.shape[1] :].tolist()
                    else:
                        seconds[name, batch].append(time.perf_counter() - start)

        scored = torch.tensor(prompts[:score_sequences])
        start = time.perf_counter()
        for first in range(0, len(scored), 32):
            batch = scored[first : first + 32]
            otter(batch, attention_mask=torch.ones_like(batch)).value[:, -1]
        scoring_seconds = time.perf_counter() - start
    return {
        "seconds": {f"{name}/{batch}": times for (name, batch), times in seconds.items()},
        "tokens": tokens,
        "scoring_seconds": scoring_seconds,
    }


# -- the vLLM side -----------------------------------------------------------------------------------------------


def time_vllm(work_dir: Path, batch_sizes: list[int], new_tokens: int, repeats: int, score_sequences: int) -> dict:
    from vllm import LLM, PoolingParams, SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids in json.loads((work_dir / "prompts.json").read_text())]
    options = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    engines = {name: LLM(model=str(work_dir / name), **options) for name in ("base", "same_size_base", "otter")}
    plain = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
    guided = SamplingParams(
        max_tokens=new_tokens,
        min_tokens=new_tokens,
        temperature=0.0,
        extra_args={"token_reward_weight": TOKEN_REWARD_WEIGHT},
    )
    variants = {
        "vllm_base": (engines["base"], plain),
        "vllm_same_size_base": (engines["same_size_base"], plain),
        "vllm_otter": (engines["otter"], plain),
        "vllm_otter_guided": (engines["otter"], guided),
    }
    seconds = {(name, batch): [] for name in variants for batch in batch_sizes}
    tokens = {}
    # Pass 0 warms every shape up (vLLM's CPU matmuls build a kernel per new shape) and gives the tokens; passes
    # 1..repeats are timed.
    for repeat in range(repeats + 1):
        for batch in batch_sizes:
            for name, (engine, params) in variants.items():
                start = time.perf_counter()
                outputs = engine.generate(prompts[:batch], params, use_tqdm=False)
                if repeat == 0:
                    tokens[f"{name}/{batch}"] = [list(output.outputs[0].token_ids) for output in outputs]
                else:
                    seconds[name, batch].append(time.perf_counter() - start)
    for engine in engines.values():
        engine.llm_engine.engine_core.shutdown()
    del engines, variants

    scorer = LLM(model=str(work_dir / "otter"), runner="pooling", **options)
    scorer.classify(prompts[:2], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    scorer.classify(prompts[:score_sequences], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    scoring_seconds = time.perf_counter() - start
    return {
        "seconds": {f"{name}/{batch}": times for (name, batch), times in seconds.items()},
        "tokens": tokens,
        "scoring_seconds": scoring_seconds,
    }


def run_hf_side(hf_python: str, *arguments) -> str:
    return subprocess.run(
        [hf_python, __file__, *map(str, arguments)], check=True, stdout=subprocess.PIPE, text=True
    ).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-python", default="python", help="a Python with otter_hf's transformers side")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--score-sequences", type=int, default=64)
    parser.add_argument(
        "--work-dir", type=Path, help="keep the checkpoints and prompts here, and reuse them when already prepared"
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON only
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    num_prompts = max(max(args.batch_sizes), args.score_sequences)

    with tempfile.TemporaryDirectory(prefix="otter-vllm-bench-") as work:
        work_dir = args.work_dir or Path(work)
        if not (work_dir / "prompts.json").is_file():
            run_hf_side(args.hf_python, "prepare", work_dir, args.prompt_tokens, num_prompts)
        load_before = os.getloadavg()[0]
        hf = json.loads(
            run_hf_side(
                args.hf_python,
                "hf",
                work_dir,
                ",".join(map(str, args.batch_sizes)),
                args.max_new_tokens,
                args.repeats,
                args.score_sequences,
            )
        )
        vllm = time_vllm(work_dir, args.batch_sizes, args.max_new_tokens, args.repeats, args.score_sequences)
        load_after = os.getloadavg()[0]

    seconds = {**hf["seconds"], **vllm["seconds"]}
    tokens = {**hf["tokens"], **vllm["tokens"]}
    generation = {}
    for batch in args.batch_sizes:
        throughput = {
            name: batch * args.max_new_tokens / statistics.median(seconds[f"{name}/{batch}"])
            for name in (
                "vllm_base",
                "vllm_same_size_base",
                "vllm_otter",
                "vllm_otter_guided",
                "hf_base",
                "hf_otter",
                "hf_otter_guided",
            )
        }
        generation[str(batch)] = {
            "output_tokens_per_s": {name: round(value, 2) for name, value in throughput.items()},
            "time_ratio_to_vllm_base": {
                name: round(throughput["vllm_base"] / value, 3) for name, value in throughput.items()
            },
            # The vLLM variants run round-robin: each repeat's time over the base's in the same repeat.
            "vllm_time_ratio_by_repeat": {
                name: [
                    round(time / base_time, 3)
                    for time, base_time in zip(seconds[f"{name}/{batch}"], seconds[f"vllm_base/{batch}"])
                ]
                for name in ("vllm_same_size_base", "vllm_otter", "vllm_otter_guided")
            },
            "tokens_equal_vllm_otter_vs_vllm_base": tokens[f"vllm_otter/{batch}"] == tokens[f"vllm_base/{batch}"],
            "tokens_equal_vllm_otter_vs_hf_otter": tokens[f"vllm_otter/{batch}"] == tokens[f"hf_otter/{batch}"],
            "tokens_equal_vllm_guided_vs_hf_guided": (
                tokens[f"vllm_otter_guided/{batch}"] == tokens[f"hf_otter_guided/{batch}"]
            ),
            "guidance_changed_tokens": tokens[f"vllm_otter_guided/{batch}"] != tokens[f"vllm_otter/{batch}"],
        }
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (embedded), fp32, Otter inserted with defaults + token reward head",
                "prompt_tokens": args.prompt_tokens,
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
                "token_reward_weight": TOKEN_REWARD_WEIGHT,
                "load_average_1min": {"before": load_before, "after": load_after},
                "generation_by_batch_size": generation,
                "scoring": {
                    "sequences": args.score_sequences,
                    "vllm_pooling_sequences_per_s": round(args.score_sequences / vllm["scoring_seconds"], 2),
                    "hf_forward_sequences_per_s": round(args.score_sequences / hf["scoring_seconds"], 2),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        prepare(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1:2] == ["hf"]:
        work_dir, batch_sizes, new_tokens, repeats, score_sequences = sys.argv[2:7]
        result = time_hf(
            Path(work_dir),
            [int(b) for b in batch_sizes.split(",")],
            int(new_tokens),
            int(repeats),
            int(score_sequences),
        )
        print(json.dumps(result))
    else:
        main()
