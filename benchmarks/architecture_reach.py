"""Otter's reach over transformers' causal LMs: which `model_type`s it is exact on, and why it refuses the others.

For every `model_type` of transformers' `AutoModelForCausalLM` mapping (or those given with `--types`): a tiny
random base from the type's own config class, shrunk (`TINY_SIZES`: hidden 64, 2 layers, 4 heads, 4 experts, a
vocabulary of 128, each where the config has the field); then `otter_hf.insert` (a registered family, or the layout
derived from the base's module names, `otter_hf/modeling/derived_layout.py`), and on it:

- the original logits against the base's with `torch.equal`, in float32 and in bfloat16 (the base cast, inserted
  again);
- greedy `generate()` of 3 tokens against the base's;
- a backward pass of the value, reaching every inserted parameter and no base one;
- `save_pretrained` and `AutoModelForCausalLM.from_pretrained`, the reloaded logits against the base's.

A type is `exact` when all of these hold. The others are counted by kind: `failed_to_build` (the shrunk base does
not build: its reason, by exception type), `refused` (insert refused; by the capture point the derived layout could
not find or the probe check it failed, layer indices dropped) and `failed` (inserted, then a check above failed, by
check). `sequence_classification` counts the built types that have a `ForSequenceClassification` class, the reach
of TRL's `RewardTrainer`, among them those Otter is exact on. Prints JSON.

    python benchmarks/architecture_reach.py > benchmarks/results/architecture_reach.json
    python benchmarks/architecture_reach.py --types llama cohere stablelm     # a few types
"""

import argparse
import collections
import contextlib
import json
import re
import signal
import sys
import tempfile
import time
import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

import otter_hf
from otter_hf.modeling import OTTER_CLASSES_BY_BASE_MODEL_TYPE, is_inserted_parameter

VOCABULARY = 128
# Config fields shrunk where a config class has them (the families' names for the same sizes).
TINY_SIZES = {
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": VOCABULARY,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Longer than any sequence here, so that sliding layers attend as full ones in the comparisons.
SLIDING_WINDOW = 64
MAX_PARAMETERS = 20_000_000
SECONDS_PER_TYPE = 600
PROMPT_LENGTH = 6


def tiny_config(model_type: str):
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    sizes = {name: value for name, value in TINY_SIZES.items() if name in defaults}
    if defaults.get("sliding_window"):
        sizes["sliding_window"] = SLIDING_WINDOW
    for field in ("text_config", "decoder"):
        if isinstance(defaults.get(field), dict):
            sizes[field] = {**defaults[field], **{k: v for k, v in TINY_SIZES.items() if k in defaults[field]}}
    config = config_class(**sizes)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != config.num_hidden_layers:
        config.layer_types = list(layer_types[: config.num_hidden_layers])
    return config


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refusal_kind(message: str) -> str:
    point = re.search(r"does not fit it at `([^`]+)`", message)
    if point is None:
        return message.split(". ")[1][:80] if ". " in message else message[:80]
    kind = re.sub(r"^layers\.\d+(\.|$)", r"layers.N\1", point.group(1))
    if kind == "forward":  # by what the base's forward raised
        kind += " " + re.search(r"probe forward failed \((\w+)", message).group(1)
    return kind


def check_inserted(base, input_ids) -> str | None:
    """The first check the model Otter makes of `base` fails, or None: every one holds."""
    otter = otter_hf.insert(base)
    with torch.no_grad():
        if not torch.equal(otter(input_ids).logits, base(input_ids).logits):
            return "float32 logits"
        greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        if not torch.equal(otter.generate(input_ids, **greedy), base.generate(input_ids, **greedy)):
            return "generate"
    otter.train()
    otter(input_ids).value.sum().backward()
    grads = {name: parameter.grad for name, parameter in otter.named_parameters()}
    if any(grad is not None for name, grad in grads.items() if not is_inserted_parameter(name)):
        return "backward reached a base parameter"
    if not all(torch.isfinite(grad).all() for grad in grads.values() if grad is not None):
        return "backward"
    otter.eval()
    with tempfile.TemporaryDirectory() as folder:
        otter.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            if not torch.equal(reloaded(input_ids).logits, base(input_ids).logits):
                return "reload"
    bfloat16 = base.to(torch.bfloat16)
    with torch.no_grad():
        if not torch.equal(otter_hf.insert(bfloat16)(input_ids).logits, bfloat16(input_ids).logits):
            return "bfloat16 logits"
    return None


def sweep_type(model_type: str) -> dict:
    result = {
        # By the config's own model_type, which a few mapping entries share with another family (gpt-sw3: gpt2).
        "registered": CONFIG_MAPPING[model_type].model_type in OTTER_CLASSES_BY_BASE_MODEL_TYPE,
        "sequence_classification": model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }
    try:
        with time_limit(SECONDS_PER_TYPE):
            torch.manual_seed(0)
            base = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    except Exception as error:
        return {**result, "status": "failed_to_build", "reason": f"{type(error).__name__}: {str(error)[:200]}"}
    if sum(parameter.numel() for parameter in base.parameters()) > MAX_PARAMETERS:
        return {**result, "status": "failed_to_build", "reason": "TooLarge: not shrunk by TINY_SIZES"}
    input_ids = torch.randint(3, VOCABULARY, (2, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    try:
        with time_limit(SECONDS_PER_TYPE), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            failure = check_inserted(base, input_ids)
    except ValueError as error:
        if "does not support the" in str(error):
            return {**result, "status": "refused", "reason": refusal_kind(str(error)), "message": str(error)[-300:]}
        return {**result, "status": "failed", "reason": "error", "message": f"ValueError: {str(error)[:300]}"}
    except Exception as error:
        return {
            **result,
            "status": "failed",
            "reason": "error",
            "message": f"{type(error).__name__}: {str(error)[:300]}",
        }
    if failure is not None:
        return {**result, "status": "failed", "reason": failure}
    return {**result, "status": "exact"}


def summary(results: dict) -> dict:
    built = {name: result for name, result in results.items() if result["status"] != "failed_to_build"}
    exact = [name for name, result in built.items() if result["status"] == "exact"]

    def count_by(status: str, key: str) -> dict:
        counts = collections.Counter(r[key] for r in results.values() if r["status"] == status)
        return dict(counts.most_common())

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "causal_lm_types": len(results),
        "built": len(built),
        "exact": len(exact),
        "exact_registered": sum(results[name]["registered"] for name in exact),
        "exact_derived": sum(not results[name]["registered"] for name in exact),
        "sequence_classification": sum(result["sequence_classification"] for result in built.values()),
        "sequence_classification_exact": sum(results[name]["sequence_classification"] for name in exact),
        "refused": count_by("refused", "reason"),
        "failed": count_by("failed", "reason"),
        "failed_to_build": dict(
            collections.Counter(r["reason"].split(":")[0] for r in results.values() if r["status"] == "failed_to_build")
        ),
        "exact_types": sorted(exact),
        "types": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="*", help="model_types to sweep (default: every causal-LM type)")
    arguments = parser.parse_args()
    transformers.logging.set_verbosity_error()
    types = arguments.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    results = {}
    for model_type in types:
        started = time.perf_counter()
        results[model_type] = sweep_type(model_type)
        # Progress on stderr, the JSON alone on stdout.
        print(f"{model_type}: {results[model_type]['status']} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    print(json.dumps(summary(results), indent=1))


if __name__ == "__main__":
    main()
