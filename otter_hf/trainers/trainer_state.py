"""The Trainer's own state in an Otter checkpoint (optimizer, learning-rate scheduler, gradient scaler, random
generators), written as safetensors and read back without unpickling.

transformers' `Trainer` writes these with `torch.save` (`optimizer.pt`, `scheduler.pt`, `scaler.pt`,
`rng_state.pth`) and resumes with `torch.load`, which unpickles whatever the checkpoint folder holds. An Otter
checkpoint stores each state as one safetensors file: its tensors as tensors, everything else (hyperparameters,
step counts, Python's generator state) as JSON in the file's metadata, with a marker where a tensor, tuple,
integer-keyed dict or numpy array stood, so that the state comes back as the optimizer or generator gave it.
"""

import json
import os
import random

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCALER_NAME, SCHEDULER_NAME

OPTIMIZER_STATE_NAME = "optimizer.safetensors"
SCHEDULER_STATE_NAME = "scheduler.safetensors"
SCALER_STATE_NAME = "scaler.safetensors"
TRAINING_ARGUMENTS_JSON_NAME = "training_args.json"
# What transformers' Trainer would have written: an Otter trainer neither writes nor reads them.
PICKLED_STATE_NAMES = (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, SCALER_NAME)

_STRUCTURE_KEY = "otter_trainer_state"


def rng_state_name(process_index: int | None) -> str:
    """`rng_state.safetensors`, or `rng_state_<i>.safetensors` for process i of a multi-process run."""
    return "rng_state.safetensors" if process_index is None else f"rng_state_{process_index}.safetensors"


def save_state(state, path: str) -> None:
    """Write a state dict (nested dicts, lists and tuples of tensors, numpy arrays and JSON values) to `path`."""
    tensors = {}
    structure = _encode(state, tensors, "state")
    save_file(tensors, path, metadata={_STRUCTURE_KEY: json.dumps(structure)})


def load_state(path: str, device: str | torch.device = "cpu"):
    """The state `save_state` wrote, with its tensors on `device`.

    Raises a ValueError naming the file when it cannot be read or its structure does not decode (a damaged or
    crafted file); whether what it holds fits its use is `resume_checks`' to say.
    """
    try:
        with safe_open(path, framework="pt", device=str(device)) as file:
            structure = (file.metadata() or {}).get(_STRUCTURE_KEY)
            names = file.keys() if structure is not None else []
            tensors = {name: file.get_tensor(name) for name in names}
        if structure is not None:
            return _decode(json.loads(structure), tensors)
    except (SafetensorError, OSError, RecursionError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path} cannot be read as a trainer state ({type(error).__name__}: {str(error)[:200]}): it is damaged "
            "or was not written by an Otter trainer. Resume from another checkpoint, or start from its weights "
            "(`otter_hf.load_otter(base, checkpoint)`) with a fresh optimizer."
        ) from None
    raise ValueError(
        f"{path} is not a trainer state written by otter_hf (its metadata lacks `{_STRUCTURE_KEY}`); resume "
        "from a checkpoint an Otter trainer wrote, or train from the start."
    )


def capture_rng_states(distributed: bool) -> dict:
    """The random generators a resumed run needs, as transformers' Trainer captures them (CPU and CUDA)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    return states


def restore_rng_states(states: dict, distributed: bool) -> None:
    """Set the generators to `states`, which must have the structure `capture_rng_states` gives (see
    `resume_checks.check_like`)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and "cuda" in states:
        if distributed:
            torch.cuda.random.set_rng_state_all(states["cuda"])
        else:
            torch.cuda.random.set_rng_state(states["cuda"])


def _encode(value, tensors: dict, name: str):
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": name}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, tensors, f"{name}.{index}") for index, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, tensors, f"{name}.{key}") for key, item in value.items()}
        if all(isinstance(key, int) for key in value):
            return {"__int_keys__": {str(key): _encode(item, tensors, f"{name}.{key}") for key, item in value.items()}}
    elif value is None or isinstance(value, (bool, int, float, str)):
        return value
    elif isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(
        f"The trainer state holds {type(value).__name__} at `{name}`, which otter_hf cannot store without pickling: "
        "an Otter checkpoint keeps tensors, numbers, strings and their lists and dicts. Use an optimizer and "
        "scheduler whose state dicts hold only those (every torch.optim one does)."
    )


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if "__int_keys__" in value:
        return {int(key): _decode(item, tensors) for key, item in value["__int_keys__"].items()}
    return {key: _decode(item, tensors) for key, item in value.items()}


def refuse_pickled_state(checkpoint: str) -> None:
    """Refuse a checkpoint whose Trainer state is pickled (`optimizer.pt`, ...) and has no safetensors copy."""
    pickled = [name for name in PICKLED_STATE_NAMES if os.path.lexists(os.path.join(checkpoint, name))]
    if pickled:
        raise ValueError(
            f"{checkpoint} holds the Trainer state as pickles ({', '.join(pickled)}), which otter_hf does not "
            f"unpickle: loading a pickle can run any code the file names. An Otter trainer writes "
            f"{OPTIMIZER_STATE_NAME} and {SCHEDULER_STATE_NAME} instead. To resume from this checkpoint anyway, "
            "convert those files yourself where you trust them, or start training from its weights "
            "(`otter_hf.load_otter(base, checkpoint)`) with a fresh optimizer."
        )
