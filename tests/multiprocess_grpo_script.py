"""Two steps of OtterGRPOTrainer on a tiny model, launched by tests/test_multiprocess_training.py under
`accelerate launch` (DDP over gloo): every process writes its adapter weights (`rank<r>.safetensors`) and
`rank<r>.json` (world size, whether its inserted and base parameters are unchanged, the Otter rewards it logged)."""

import json
import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file

from otter_hf.trainers import OtterGRPOConfig, OtterGRPOTrainer

# Launched as a script: the repository root makes the tests' helpers importable by package path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import make_base, make_otter, make_tokenizer  # noqa: E402

PROMPTS = ["how was the movie ?", "how was the food ?", "tell me about your day .", "what do you think of my idea ?"]


def main():
    folder = sys.argv[1]
    otter = make_otter(make_base("llama-gqa-tied"))
    frozen_before = {name: tensor.clone() for name, tensor in otter.state_dict().items()}
    args = OtterGRPOConfig(
        output_dir=os.path.join(folder, "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-2,
        beta=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = OtterGRPOTrainer(
        model=otter,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS * 2]),
        processing_class=make_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    after = policy.get_base_model().state_dict()
    frozen_after = {name.replace(".base_layer", ""): tensor for name, tensor in after.items() if "lora_" not in name}
    rank = trainer.args.process_index
    save_file(
        {name: tensor.contiguous() for name, tensor in after.items() if "lora_" in name},
        os.path.join(folder, f"rank{rank}.safetensors"),
    )
    report = {
        "world_size": trainer.args.world_size,
        "frozen_unchanged": frozen_after.keys() == frozen_before.keys()
        and all(torch.equal(frozen_before[name], frozen_after[name]) for name in frozen_before),
        "otter_rewards": [
            log["rewards/otter_value/mean"] for log in trainer.state.log_history if "rewards/otter_value/mean" in log
        ],
    }
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main()
