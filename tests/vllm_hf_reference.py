"""Builds the tiny checkpoints of tests/test_vllm.py and what otter_hf computes on them in transformers.

Run with the Python environment that has otter_hf's transformers side (vLLM's environment pins an older
transformers): `python tests/vllm_hf_reference.py OUT_DIR`. For each architecture it writes, under OUT_DIR, a base
checkpoint and its Otter checkpoint (`save_pretrained`, with the tiny tokenizer), and `reference.json`: the greedy
tokens of `generate()` with and without `token_reward_weight`, and the value at every prompt position.
"""

import json
import sys
from pathlib import Path

import torch

# Run as a script: the repository root makes the tests' helpers importable by package path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import make_base, make_otter, make_tokenizer  # noqa: E402

# The CPU attention of vLLM takes head sizes that are multiples of 32, so the tiny models use 32.
VLLM_ARCHITECTURES = {
    "llama": ("llama-gqa-tied", dict(head_dim=32)),
    "qwen2": ("qwen2-bias", dict(num_attention_heads=2, num_key_value_heads=1)),
    "qwen3": ("qwen3-qk-norm", dict(head_dim=32)),
}
INSERTION = dict(
    token_reward_head=True, inserted_hidden_size=24, inserted_num_attention_heads=2, inserted_intermediate_size=40
)
PROMPTS = [[2, 5, 9, 14, 20, 33, 41], [2, 7, 8], [2, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70], [2, 90]]
NEW_TOKENS = 12
TOKEN_REWARD_WEIGHTS = [0.005, 0.5]


def greedy(model, prompt: list[int], **kwargs) -> list[int]:
    # min_new_tokens keeps EOS out as vLLM's `min_tokens` does, so both sides decode the same number of tokens.
    output = model.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs
    )
    return output[0, len(prompt) :].tolist()


def main(out_dir: Path) -> None:
    tokenizer = make_tokenizer()
    reference = {"prompts": PROMPTS, "new_tokens": NEW_TOKENS, "architectures": {}}
    for name, (base_name, overrides) in VLLM_ARCHITECTURES.items():
        base = make_base(base_name, **overrides)
        base.save_pretrained(out_dir / name / "base")
        tokenizer.save_pretrained(out_dir / name / "base")
        otter = make_otter(base, **INSERTION).eval()
        # A trained token reward head is not zero; give it values that move the argmax.
        with torch.no_grad():
            otter.token_reward_head.proj.weight.normal_(std=0.02)
        otter.save_pretrained(out_dir / name / "otter")
        tokenizer.save_pretrained(out_dir / name / "otter")
        with torch.no_grad():
            values = [otter(torch.tensor([prompt])).value[0].tolist() for prompt in PROMPTS]
        reference["architectures"][name] = {
            "greedy": [greedy(otter, prompt) for prompt in PROMPTS],
            "guided": {
                str(weight): [greedy(otter, prompt, token_reward_weight=weight) for prompt in PROMPTS]
                for weight in TOKEN_REWARD_WEIGHTS
            },
            "values": values,
        }
    (out_dir / "reference.json").write_text(json.dumps(reference))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
