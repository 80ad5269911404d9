"""What every Otter trainer changes in transformers' `Trainer` so that it trains across processes (`accelerate
launch`, `torchrun`: DDP, FSDP) and writes small checkpoints.

- Only the parameters the trainer's loss reads are trainable. The base is frozen, and so are the inserted heads
  the loss never reads (the draft heads, when training a reward), for the run: every trainable parameter then gets
  a gradient at every step, so DDP buckets and all-reduces exactly those, and needs no search for unused
  parameters. That search (`find_unused_parameters=True`, transformers' default for a model without activation
  checkpointing) walks the autograd graph from the wrapped forward's outputs; a draft head runs on those outputs
  outside the wrapped forward, so the search would call it unused and DDP would then fail when its gradient
  arrives. The next Otter trainer makes every inserted parameter trainable again (`freeze_base_parameters`).
- A checkpoint (`checkpoint-<step>`) holds the inserted parameters as `model.save_otter` writes them (attach them
  to the base with `otter_hf.load_otter(base, checkpoint)`), the optimizer state of the trainable ones, and the
  Trainer's own state, not a copy of the frozen base. The optimizer, scheduler, scaler and random generator states
  are safetensors (`trainer_state.py`), never pickles, and resuming reads them back without unpickling. The final
  `save_model` still writes the whole model. Under FSDP or DeepSpeed, which shard the parameters and save them
  their own way, the Trainer's checkpoints are left as they are.
"""

import contextlib
import os
from unittest import mock

import torch
import transformers.trainer
from safetensors.torch import load_file
from transformers import TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer import TRAINING_ARGS_NAME as PICKLED_TRAINING_ARGUMENTS_NAME
from transformers.trainer_utils import get_last_checkpoint

from ..lifecycle.insertion import _load_inserted_weights
from ..modeling.inserted_heads import INSERTED_HEADS
from ..modeling.persistence import OTTER_WEIGHTS_NAME, reading_checkpoint
from .resume_checks import CheckpointStateError, check_like, check_optimizer_state, read_trainer_state
from .trainer_state import (
    OPTIMIZER_STATE_NAME,
    SCALER_STATE_NAME,
    SCHEDULER_STATE_NAME,
    TRAINING_ARGUMENTS_JSON_NAME,
    capture_rng_states,
    load_state,
    refuse_pickled_state,
    restore_rng_states,
    rng_state_name,
    save_state,
)

HEAD_ATTRIBUTES = frozenset(head.attribute for head in INSERTED_HEADS)


class OtterTrainerMixin:
    """Mixed into every Otter trainer before transformers' `Trainer` (see the module docstring).

    Subclasses set `heads_in_loss`, the `INSERTED_HEADS` attributes their loss reads, and override
    `loss_reads_inserted_layers` when the loss may not read the inserted stream.
    """

    heads_in_loss: tuple[str, ...] = ("v_head",)
    # Whether the loss runs inserted heads on the wrapped forward's outputs, outside that forward.
    runs_heads_outside_forward: bool = False

    def loss_reads_inserted_layers(self, model) -> bool:
        return True

    def prepare_trainable_parameters(self, model, args) -> None:
        """Freeze the base and the inserted parameters the loss never reads; no search for unused ones in DDP."""
        model.freeze_base_parameters()
        reads_layers = self.loss_reads_inserted_layers(model)
        for name, parameter in model.otter_named_parameters():
            owner = name.split(".", 1)[0]
            parameter.requires_grad_(owner in self.heads_in_loss if owner in HEAD_ATTRIBUTES else reads_layers)
        if args is None:
            return
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False
        elif args.ddp_find_unused_parameters and self.runs_heads_outside_forward:
            raise ValueError(
                f"{type(self).__name__} does not take `ddp_find_unused_parameters=True`: its loss runs heads on the "
                "model's outputs outside the DDP-wrapped forward, which that search would mark unused, and DDP would "
                "fail when their gradients arrive. Leave it unset: the trainer freezes what its loss does not read."
            )

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.args.world_size == 1:
            raise ValueError(
                f"{launched} processes were launched, but each would train alone, unsynchronised, and write the same "
                "files: without a GPU, the processes join over gloo only with `use_cpu=True` in the training "
                "arguments."
            )
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version == 2:
            prepare_fsdp2_plugin(self.accelerator.state.fsdp_plugin, self.model)
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            # Measured on 2 CPU processes: the backward fails with "The size of tensor a (16) must match the size of
            # tensor b (0)", a parameter released after the forward, as with FSDP2's resharding (prepare_fsdp2_plugin).
            raise ValueError(
                "DeepSpeed ZeRO-3 releases a layer's gathered parameters after its forward and gathers them again "
                "when the backward reaches the layer's output, which in an Otter layer is the frozen base stream: "
                "the backward of the inserted parameters then finds them released. Use ZeRO-2 (or ZeRO-1), or FSDP2 "
                "with `reshard_after_forward: false`."
            )

    def _otter_model(self):
        # The reward trainer trains a sequence-classification view and saves the causal LM it shares parameters with.
        return getattr(self, "otter_model", None) or self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _writes_inserted_checkpoints(self) -> bool:
        return not (self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def _save_checkpoint(self, model, trial):
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (getattr(self, "_saving_checkpoint", False) and self._writes_inserted_checkpoints()):
            return super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        self.save_checkpoint_weights(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def save_checkpoint_weights(self, output_dir: str) -> None:
        """The weights a checkpoint holds: the trained inserted parameters (a trainer whose trained weights are not
        Otter's, such as a PEFT adapter, writes those instead)."""
        self._otter_model().save_otter(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        with training_arguments_as_json():
            super()._save(output_dir, state_dict=state_dict)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        with training_arguments_as_json():
            super()._push_from_checkpoint(checkpoint_folder)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:  # the Trainer's "the last checkpoint of output_dir", resolved here too
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No checkpoint to resume from in {self.args.output_dir}: it holds no `checkpoint-<step>` folder."
                )
        if resume_from_checkpoint is not None and self._writes_inserted_checkpoints():
            self._check_checkpoint_files(os.fspath(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_checkpoint_files(self, checkpoint: str) -> None:
        """Before anything is read from `checkpoint` for use: refuse pickles, check `trainer_state.json`'s fields
        and that each state file decodes (each is checked against its use when it is loaded)."""
        if not os.path.isdir(checkpoint):
            raise ValueError(f"Cannot resume from {checkpoint}: there is no such folder.")
        refuse_pickled_state(checkpoint)
        trainer_state = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if not os.path.isfile(trainer_state):
            raise ValueError(
                f"Cannot resume from {checkpoint}: it holds no {TRAINER_STATE_NAME}, so the step to resume from is "
                "unknown. Resume from a `checkpoint-<step>` folder a trainer wrote."
            )
        read_trainer_state(trainer_state)
        for name in (OPTIMIZER_STATE_NAME, SCHEDULER_STATE_NAME, SCALER_STATE_NAME, self._rng_state_file("")):
            if os.path.isfile(os.path.join(checkpoint, name)):
                load_state(os.path.join(checkpoint, name))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._load_inserted_checkpoint(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_inserted_checkpoint(self.state.best_model_checkpoint):
            super()._load_best_model()

    # -- the Trainer's own state, as safetensors (see trainer_state.py) --------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._writes_inserted_checkpoints():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_state(self.optimizer.state_dict(), os.path.join(output_dir, OPTIMIZER_STATE_NAME))
            save_state(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._writes_inserted_checkpoints():
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer_file = os.path.join(checkpoint, OPTIMIZER_STATE_NAME)
        scheduler_file = os.path.join(checkpoint, SCHEDULER_STATE_NAME)
        if not (os.path.isfile(optimizer_file) and os.path.isfile(scheduler_file)):
            refuse_pickled_state(checkpoint)
            return  # as the Trainer does: a checkpoint without optimizer state resumes with a fresh optimizer
        # In a multi-process run on GPUs, each process loads its copy onto its own device.
        device = self.args.device if self.args.world_size > 1 and self.args.device.type != "cpu" else "cpu"
        optimizer_state, scheduler_state = load_state(optimizer_file, device), load_state(scheduler_file)
        check_optimizer_state(self.optimizer, optimizer_state, optimizer_file)
        check_like(self.lr_scheduler.state_dict(), scheduler_state, scheduler_file, "state")
        self.optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(scheduler_state)

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if not self._writes_inserted_checkpoints() or scaler is None:
            return super()._save_scaler(output_dir)
        if self.args.should_save:
            save_state(scaler.state_dict(), os.path.join(output_dir, SCALER_STATE_NAME))

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._writes_inserted_checkpoints():
            return super()._load_scaler(checkpoint)
        refuse_pickled_state(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        scaler_file = os.path.join(checkpoint, SCALER_STATE_NAME)
        # A run without a gradient scaler (no float16) has no use for one a float16 run saved.
        if scaler is not None and os.path.isfile(scaler_file):
            scaler_state = load_state(scaler_file)
            check_like(scaler.state_dict(), scaler_state, scaler_file, "state")
            if not scaler_state["scale"] > 0:
                raise CheckpointStateError(scaler_file, "state.scale", f"is {scaler_state['scale']}, not above 0")
            scaler.load_state_dict(scaler_state)

    def _rng_state_file(self, folder: str) -> str:
        return os.path.join(folder, rng_state_name(self.args.process_index if self.args.world_size > 1 else None))

    def _save_rng_state(self, output_dir: str) -> None:
        if not self._writes_inserted_checkpoints():
            return super()._save_rng_state(output_dir)
        # Every process writes its own; one may arrive before the main process has created the folder.
        os.makedirs(output_dir, exist_ok=True)
        save_state(capture_rng_states(self.args.world_size > 1), self._rng_state_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._writes_inserted_checkpoints():
            return super()._load_rng_state(checkpoint)
        rng_file = self._rng_state_file(checkpoint)
        if os.path.isfile(rng_file):
            distributed = self.args.world_size > 1
            states, expected = load_state(rng_file), capture_rng_states(distributed)
            if isinstance(states, dict) and "cuda" not in expected:
                states.pop("cuda", None)  # saved on a GPU, resumed without one
            check_like(expected, states, rng_file, "state")
            try:
                restore_rng_states(states, distributed)
            except (ValueError, TypeError, OverflowError, RuntimeError) as error:
                raise CheckpointStateError(rng_file, "state", f"is no generator state ({error})") from None
        # Without it (a checkpoint written with another number of processes), the Trainer too resumes with the
        # current generators; a pickled `rng_state*.pth` is not read.

    def _load_inserted_checkpoint(self, checkpoint: str) -> bool:
        """Load the inserted parameters of a checkpoint this mixin wrote; False for any other checkpoint."""
        weights = os.path.join(checkpoint, OTTER_WEIGHTS_NAME)
        if not (self._writes_inserted_checkpoints() and os.path.isfile(weights)):
            return False
        # As `load_otter` reads a save: whole, never half of one the main process is still writing.
        with reading_checkpoint(checkpoint):
            _load_inserted_weights(self._otter_model(), load_file(weights), source=weights)
        return True


class _TorchSavingArgumentsAsJson:
    """torch, for transformers' Trainer module, except that `save` writes training arguments as JSON."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def save(obj, path, *args, **kwargs):
        if isinstance(obj, TrainingArguments) and os.path.basename(path) == PICKLED_TRAINING_ARGUMENTS_NAME:
            with open(os.path.join(os.path.dirname(path), TRAINING_ARGUMENTS_JSON_NAME), "w", encoding="utf-8") as file:
                file.write(obj.to_json_string())
            return
        torch.save(obj, path, *args, **kwargs)


@contextlib.contextmanager
def training_arguments_as_json():
    """Inside the block, transformers' Trainer writes the training arguments as `training_args.json` where it would
    pickle them into `training_args.bin` (in `_save`, and when it pushes a checkpoint to the Hub): an Otter save
    holds no pickle. The Trainer's other uses of torch are torch's own."""
    with mock.patch.object(transformers.trainer, "torch", _TorchSavingArgumentsAsJson()):
        yield


def prepare_fsdp2_plugin(plugin, model) -> None:
    """Fit accelerate's FSDP2 plugin to an Otter model, before the Trainer wraps it: refuse resharding after the
    forward, and give each float32 head its own unit (see the error and the comment below)."""
    from accelerate.utils.dataclasses import get_module_class_from_name
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.reshard_after_forward:
        raise ValueError(
            "FSDP2 with `reshard_after_forward=True` frees a decoder layer's gathered parameters after its forward "
            "and gathers them again when the backward reaches the layer's output; an Otter layer's output is the "
            "frozen base stream, which the backward never reaches, so its inserted parameters would be freed "
            "while their gradients still need them. Set `reshard_after_forward: false` (`fsdp_reshard_after_forward` "
            "in the accelerate config): parameters stay sharded between steps and gathered within one."
        )
    # FSDP2 gathers a unit's parameters as one flat tensor of one dtype: in a bf16 model the value head, kept in
    # float32, cannot share the root's unit.
    float32_heads = [
        type(module).__name__
        for module in (getattr(model, head.attribute, None) for head in INSERTED_HEADS if head.keep_in_fp32)
        if module is not None
    ]
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy:
        layers = plugin.transformer_cls_names_to_wrap or [
            name for name in model._no_split_modules or [] if get_module_class_from_name(model, name) is not None
        ]
        plugin.transformer_cls_names_to_wrap = [*layers, *(name for name in float32_heads if name not in layers)]
