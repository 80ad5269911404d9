"""Checks on every file a resumed run reads from a checkpoint, run before anything uses it.

A checkpoint folder may come from anywhere (a colleague, a download, a disk that filled up). The optimizer,
scheduler and random-generator states are compared with what this run's own optimizer, scheduler and generators
hold: the same structure, each value of the same type, each tensor of the shape and dtype of its parameter and
finite, each hyper-parameter finite and in its range. `trainer_state.json` must parse into `TrainerState`'s
fields with their types. Otherwise fused AdamW writes out of bounds on a shrunk `exp_avg` (a segfault), a NaN
learning rate is applied until the next save, and a malformed file surfaces as a raw `KeyError` or
`RecursionError`. Each failure is one `CheckpointStateError` naming the file and the field.
"""

import dataclasses
import json
import math
import os

import numpy as np
import torch
from transformers.trainer_callback import TrainerState

# Optimizer hyper-parameters with a range (torch.optim's names); the others need only be finite.
_HYPERPARAMETER_RANGES = {
    "lr": (0.0, math.inf, "a learning rate, at least 0"),
    "initial_lr": (0.0, math.inf, "a learning rate, at least 0"),
    "weight_decay": (0.0, math.inf, "at least 0"),
    "eps": (0.0, math.inf, "at least 0"),
    "momentum": (0.0, 1.0, "from 0 to 1"),
    "dampening": (0.0, 1.0, "from 0 to 1"),
    "alpha": (0.0, 1.0, "from 0 to 1"),
    "betas": (0.0, 1.0, "each from 0 to 1"),
}
# The largest `trainer_state.json` read: a log entry per logging step of a very long run fits many times over.
MAX_TRAINER_STATE_BYTES = 256 * 2**20


class CheckpointStateError(ValueError):
    """A file of a checkpoint that this run cannot resume from, naming the file and the field."""

    def __init__(self, path, field: str, problem: str):
        super().__init__(
            f"Cannot resume from {path}: `{field}` {problem}. The file is damaged, or was written by another "
            "optimizer, scheduler or model; resume from another checkpoint, or start from its weights "
            "(`otter_hf.load_otter(base, checkpoint)`) with a fresh optimizer."
        )


def check_like(expected, loaded, path, field: str) -> None:
    """Raise a CheckpointStateError unless `loaded` has the structure and types of `expected` (what this run's own
    object holds), every tensor and array of its shape and dtype, and every float and float tensor finite.

    A None in `expected` (an option left unset, or a value not drawn yet) takes any JSON scalar.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            raise CheckpointStateError(path, field, f"is {_kind(loaded)}, not a tensor")
        if loaded.shape != expected.shape or loaded.dtype != expected.dtype:
            raise CheckpointStateError(
                path,
                field,
                f"is a {loaded.dtype} tensor of shape {tuple(loaded.shape)}, not {expected.dtype} "
                f"{tuple(expected.shape)}",
            )
        _check_finite_tensor(loaded, path, field)
    elif isinstance(expected, np.ndarray):
        if not isinstance(loaded, np.ndarray) or loaded.shape != expected.shape or loaded.dtype != expected.dtype:
            raise CheckpointStateError(path, field, f"is not an array of {expected.dtype} {expected.shape}")
    elif isinstance(expected, (list, tuple)):
        if type(loaded) is not type(expected) or len(loaded) != len(expected):
            raise CheckpointStateError(
                path, field, f"is {_kind(loaded)}, not a {type(expected).__name__} of {len(expected)} items"
            )
        for index, (expected_item, loaded_item) in enumerate(zip(expected, loaded, strict=True)):
            check_like(expected_item, loaded_item, path, f"{field}[{index}]")
    elif isinstance(expected, dict):
        if not isinstance(loaded, dict) or loaded.keys() != expected.keys():
            keys = sorted(map(str, loaded)) if isinstance(loaded, dict) else _kind(loaded)
            raise CheckpointStateError(path, field, f"holds {keys}, not {sorted(map(str, expected))}")
        for key, expected_item in expected.items():
            check_like(expected_item, loaded[key], path, f"{field}.{key}")
    elif expected is None:
        if not (loaded is None or isinstance(loaded, (bool, int, float, str))):
            raise CheckpointStateError(path, field, f"is {_kind(loaded)}, not a plain value")
        check_finite_number(loaded, path, field)
    elif isinstance(expected, (bool, str)):
        if type(loaded) is not type(expected):
            raise CheckpointStateError(path, field, f"is {_kind(loaded)}, not a {type(expected).__name__}")
    elif isinstance(expected, int):
        if type(loaded) is not int:
            raise CheckpointStateError(path, field, f"is {_kind(loaded)}, not an integer")
    elif isinstance(expected, float):
        if isinstance(loaded, bool) or not isinstance(loaded, (int, float)):
            raise CheckpointStateError(path, field, f"is {_kind(loaded)}, not a number")
        check_finite_number(loaded, path, field)


def check_finite_number(value, path, field: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointStateError(path, field, f"is {value}, not a finite number")


def check_optimizer_state(optimizer, loaded, path) -> None:
    """`loaded` (an optimizer state dict) fits `optimizer`: the same parameter groups with finite hyper-parameters
    in range, and per parameter the state tensors of its shape and dtype, finite."""
    expected = optimizer.state_dict()
    if not isinstance(loaded, dict) or loaded.keys() != expected.keys():
        raise CheckpointStateError(path, "state dict", f"is not an optimizer state ({_kind(loaded)})")
    check_like(expected["param_groups"], loaded["param_groups"], path, "param_groups")
    for index, (expected_group, group) in enumerate(zip(expected["param_groups"], loaded["param_groups"], strict=True)):
        if group["params"] != expected_group["params"]:
            raise CheckpointStateError(
                path, f"param_groups[{index}].params", "numbers other parameters than this run's optimizer holds"
            )
    for index, group in enumerate(loaded["param_groups"]):
        for name, (low, high, requirement) in _HYPERPARAMETER_RANGES.items():
            values = group.get(name)
            for value in values if isinstance(values, tuple) else (values,):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
                    raise CheckpointStateError(path, f"param_groups[{index}].{name}", f"is {value}, not {requirement}")
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    state = loaded["state"]
    if not isinstance(state, dict):
        raise CheckpointStateError(path, "state", f"is {_kind(state)}, not a dict of per-parameter states")
    for key, parameter_state in state.items():
        if not (type(key) is int and 0 <= key < len(parameters)):
            raise CheckpointStateError(path, f"state.{key}", f"names no parameter (there are {len(parameters)})")
        if not isinstance(parameter_state, dict):
            raise CheckpointStateError(path, f"state.{key}", f"is {_kind(parameter_state)}, not a dict")
        parameter = parameters[key]
        for name, value in parameter_state.items():
            field = f"state.{key}.{name}"
            if isinstance(value, torch.Tensor):
                if value.dim() == 0:  # a step count
                    _check_finite_tensor(value, path, field)
                    if value.item() < 0:
                        raise CheckpointStateError(path, field, f"is {value.item()}, below 0")
                elif value.shape != parameter.shape or value.dtype != parameter.dtype:
                    raise CheckpointStateError(
                        path,
                        field,
                        f"is a {value.dtype} tensor of shape {tuple(value.shape)}, but its parameter is "
                        f"{parameter.dtype} {tuple(parameter.shape)}",
                    )
                else:
                    _check_finite_tensor(value, path, field)
            elif isinstance(value, (bool, int, float)) or value is None:
                check_finite_number(value, path, field)
            else:
                raise CheckpointStateError(path, field, f"is {_kind(value)}, not a tensor or number")


def read_trainer_state(path) -> TrainerState:
    """`trainer_state.json` as transformers' `TrainerState`, refusing a file whose fields it would misread."""
    if os.path.getsize(path) > MAX_TRAINER_STATE_BYTES:
        raise CheckpointStateError(path, "file", f"is over {MAX_TRAINER_STATE_BYTES >> 20} MB")
    try:
        with open(path, encoding="utf-8") as file:
            state = json.load(file)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointStateError(path, "file", f"is not valid JSON ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointStateError(path, "file", f"holds {_kind(state)}, not a JSON object")
    fields = {field.name for field in dataclasses.fields(TrainerState)}
    unknown = sorted(state.keys() - fields)
    if unknown:
        raise CheckpointStateError(path, unknown[0], "is not a field of transformers' TrainerState")
    for name, value in state.items():
        _check_trainer_state_field(path, name, value)
    return TrainerState(**state)


_COUNTS = ("global_step", "max_steps", "num_input_tokens_seen")
_NUMBERS = ("epoch", "logging_steps", "eval_steps", "save_steps", "num_train_epochs", "total_flos")
_FLAGS = ("is_local_process_zero", "is_world_process_zero", "is_hyper_param_search")


def _check_trainer_state_field(path, name: str, value) -> None:
    def is_count(item):
        return type(item) is int and item >= 0

    def is_number(item):
        return isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item) and item >= 0

    if name in _COUNTS:
        ok, requirement = is_count(value), "an integer, at least 0"
    elif name in _NUMBERS:
        ok, requirement = is_number(value), "a finite number, at least 0"
    elif name in _FLAGS:
        ok, requirement = isinstance(value, bool), "true or false"
    elif name in ("train_batch_size", "best_global_step"):
        ok, requirement = value is None or is_count(value), "an integer, at least 0, or null"
    elif name == "best_metric":
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        requirement = "a number or null"
    elif name in ("best_model_checkpoint", "trial_name"):
        ok, requirement = value is None or isinstance(value, str), "a string or null"
    elif name == "log_history":
        ok = isinstance(value, list) and all(
            isinstance(entry, dict) and all(_is_scalar(item) for item in entry.values()) for entry in value
        )
        requirement = "a list of objects of numbers and strings"
    elif name == "trial_params":
        ok = value is None or (isinstance(value, dict) and all(_is_scalar(item) for item in value.values()))
        requirement = "an object of numbers and strings, or null"
    elif name == "stateful_callbacks":
        ok = value is None or (
            isinstance(value, dict)
            and all(
                all(_is_callback_state(state) for state in (states if isinstance(states, list) else [states]))
                for states in value.values()
            )
        )
        requirement = "an object of callback states, each with `args` and `attributes` objects"
    else:
        ok, requirement = _is_scalar(value), "a number, string or null"
    if not ok:
        raise CheckpointStateError(path, name, f"is {_kind(value)} {_short(value)}, not {requirement}")


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _is_callback_state(state) -> bool:
    return (
        isinstance(state, dict)
        and isinstance(state.get("args"), dict)
        and isinstance(state.get("attributes"), dict)
        and all(isinstance(key, str) for key in state["args"])
    )


def _check_finite_tensor(tensor: torch.Tensor, path, field: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CheckpointStateError(path, field, "holds NaN or infinite values")


def _kind(value) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _short(value) -> str:
    text = repr(value)
    return f"({text[:40]}...)" if len(text) > 40 else f"({text})"
