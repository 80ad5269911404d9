"""One Otter training run on a tiny model, launched by tests/test_multiprocess_training.py as `python`, `torchrun`
or `accelerate launch` (DDP over gloo, FSDP): every process writes what it trained and what it communicated.

Each process writes `rank<r>.safetensors` (its inserted weights after training) and `rank<r>.json`: the parameters
with a gradient at the first optimizer step, the parameters DDP all-reduced (recorded by a communication hook) and
its reducer's own count, whether the original logits still equal the base model's, and the value head's dtype.
The rows are in a fixed order (sequential sampling), so a run on several processes sees, step by step, the same
rows as one process at the same global batch.
"""

import argparse
import json
import os
import sys

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import TrainerCallback

import otter_hf
from otter_hf.trainers import (
    OtterDraftConfig,
    OtterDraftTrainer,
    OtterExpertConfig,
    OtterExpertTrainer,
    OtterRewardConfig,
    OtterRewardTrainer,
    OtterTokenRewardConfig,
    OtterTokenRewardTrainer,
    OtterValueConfig,
    OtterValueTrainer,
)

# Launched as a script: the repository root makes the tests' helpers importable by package path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import BAD, GOOD, QUESTIONS, make_base, make_tokenizer, random_batch  # noqa: E402

BASE_NAME = "llama-gqa-tied"

# What each run inserts: every model also carries a head its trainer's loss never reads, which the trainer must
# freeze for DDP to run without searching for unused parameters.
INSERTION = {
    "reward": dict(num_draft_heads=2),
    "value": dict(token_reward_head=True),
    "token-reward": dict(token_reward_head=True, num_draft_heads=2),
    "draft-heads": dict(num_draft_heads=2),
    "draft-recurrent": dict(num_recurrent_drafts=2, draft_vocab_size=32),
    "experts": dict(expert_heads=True, token_reward_head=True),
}


def preference_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "chosen": [{"role": "assistant", "content": " ".join(GOOD[(i + j) % len(GOOD)] for j in range(1 + i % 3))}],
            "rejected": [{"role": "assistant", "content": BAD[(i + 1) % len(BAD)]}],
        }
        for i in range(n)
    ]


def training_setup(kind: str, num_rows: int):
    if kind in ("reward", "token-reward"):
        config_class = OtterRewardConfig if kind == "reward" else OtterTokenRewardConfig
        trainer_class = OtterRewardTrainer if kind == "reward" else OtterTokenRewardTrainer
        return config_class, trainer_class, Dataset.from_list(preference_rows(num_rows))
    if kind == "experts":  # each pair makes two rows, one per head
        return OtterExpertConfig, OtterExpertTrainer, Dataset.from_list(preference_rows(num_rows))
    if kind == "value":
        rows = [
            {
                "prompt": QUESTIONS[i % len(QUESTIONS)],
                "completion": (GOOD if i % 2 else BAD)[i % 5],
                "label": float(i % 2),
            }
            for i in range(num_rows)
        ]
        return OtterValueConfig, OtterValueTrainer, Dataset.from_list(rows)
    rows = [{"text": " ".join(GOOD[(i + j) % len(GOOD)] for j in range(2 + i % 3))} for i in range(num_rows)]
    return OtterDraftConfig, OtterDraftTrainer, Dataset.from_list(rows)


class RecordCommunication(TrainerCallback):
    """Records, at the first optimizer step, which parameters hold a gradient and which DDP all-reduced."""

    def __init__(self):
        self.trainer = None
        self.all_reduced = []
        self.reducer = None
        self.with_gradient = None

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        names = {id(parameter): name for name, parameter in wrapped.module.named_parameters()}

        def record_and_all_reduce(_, bucket):
            if not self.all_reduced or len(self.all_reduced) < len(names):
                self.all_reduced += [names[id(parameter)] for parameter in bucket.parameters()]
            return default_hooks.allreduce_hook(None, bucket)

        wrapped.register_comm_hook(None, record_and_all_reduce)
        logging_data = wrapped._get_ddp_logging_data()
        self.reducer = {
            key: logging_data.get(key)
            for key in ("num_parameter_tensors", "total_parameter_size_bytes", "bucket_sizes", "find_unused_parameters")
        }

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.with_gradient is None:
            self.with_gradient = sorted(
                name for name, parameter in model.named_parameters() if parameter.grad is not None
            )
            self.all_reduced_first_step = sorted(set(self.all_reduced))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(INSERTION))
    parser.add_argument("output", help="folder for the trainer's output and each process's results")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="rows per process and micro-batch")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--global-batch", type=int, required=True, help="rows per optimizer step, all processes")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--save-steps", type=int)
    parser.add_argument("--resume-from")
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--model-dtype", default="float32", help="the dtype the model is loaded in")
    parser.add_argument("--deepspeed-stage", type=int, help="train under DeepSpeed ZeRO at this stage")
    options = parser.parse_args()

    torch.set_num_threads(1)
    dtype = getattr(torch, options.model_dtype)
    model = otter_hf.insert(make_base(BASE_NAME).to(dtype), **INSERTION[options.kind])
    # The inserted blocks start at zero; random values make every inserted path carry a gradient from step one.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.otter_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.05)
    initial = {name: tensor.detach().float().clone() for name, tensor in model.otter_state_dict().items()}
    saves = []

    def counted(method: str):
        save = getattr(model, method)

        def save_and_count(*args, **kwargs):
            saves.append(method)
            return save(*args, **kwargs)

        return save_and_count

    for method in ("save_otter", "save_pretrained"):
        setattr(model, method, counted(method))
    config_class, trainer_class, dataset = training_setup(options.kind, options.steps * options.global_batch)
    config = config_class(
        output_dir=os.path.join(options.output, "trainer"),
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.accumulation,
        learning_rate=options.learning_rate,
        optim=options.optim,
        train_sampling_strategy="sequential",
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        bf16=options.bf16,
        # Without a GPU, the processes join over gloo only when told to use the CPU.
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        max_length=64,
        deepspeed=None
        if options.deepspeed_stage is None
        else {
            "zero_optimization": {"stage": options.deepspeed_stage},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            # The Trainer's own optimizer (SGD here), which ZeRO has no tests of.
            "zero_allow_untested_optimizer": True,
        },
    )
    recorder = RecordCommunication()
    trainer = trainer_class(
        model, args=config, train_dataset=dataset, processing_class=make_tokenizer(), callbacks=[recorder]
    )
    recorder.trainer = trainer
    if trainer.args.world_size * options.batch_size * options.accumulation != options.global_batch:
        raise ValueError(f"--global-batch {options.global_batch} is not what {trainer.args.world_size} processes train")
    trainer.train(resume_from_checkpoint=options.resume_from)

    rank = trainer.args.process_index
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    model = getattr(trainer, "otter_model", model)
    input_ids, attention_mask = (tensor.to(trainer.args.device) for tensor in random_batch(2, 10, "right"))
    with torch.no_grad():
        outputs = model(input_ids, attention_mask=attention_mask)
        base = make_base(BASE_NAME).to(dtype=dtype, device=trainer.args.device)
        base_logits = base(input_ids, attention_mask=attention_mask).logits
    # Under FSDP each process holds a shard of every parameter (a DTensor): the whole tensor is gathered.
    state = {
        name: (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().float().cpu().contiguous()
        for name, tensor in model.otter_state_dict().items()
    }
    save_file(state, os.path.join(options.output, f"rank{rank}.safetensors"))
    if rank == 0:
        save_file(initial, os.path.join(options.output, "initial.safetensors"))
    results = {
        "world_size": trainer.args.world_size,
        "trainable": sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "inserted": sorted(name for name, _ in model.otter_named_parameters()),
        "with_gradient": recorder.with_gradient,
        "all_reduced": getattr(recorder, "all_reduced_first_step", None),
        "reducer": recorder.reducer,
        "original_logits_equal": bool(torch.equal(outputs.logits, base_logits)),
        "v_head_dtype": str(model.v_head.summary.weight.dtype),
        "value_dtype": str(outputs.value.dtype),
        "saves": saves,
    }
    with open(os.path.join(options.output, f"rank{rank}.json"), "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
