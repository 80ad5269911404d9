"""Training text for draft heads: the model's own greedy continuations of prompts (self-distillation, as in Medusa)."""

import contextlib

import torch
from datasets import Dataset


@torch.no_grad()
def build_self_distillation_dataset(
    model, tokenizer, prompts: list, max_new_tokens: int = 128, batch_size: int = 8, chat_template: bool | None = None
) -> Dataset:
    """The base model's own greedy continuations of `prompts`, as an `input_ids` + `completion_mask` dataset.

    Generation runs the base computation only (`otter_disabled()`), which gives exactly the tokens the base model
    (and speculative decoding) would produce. Prompts are strings or chat conversations (lists of messages); strings
    go through the chat template when `chat_template` is true (the default when the tokenizer has one). The prompt
    tokens are context only (`completion_mask` 0); a continuation keeps its end-of-sequence token and stops there.
    """
    if chat_template is None:
        chat_template = tokenizer.chat_template is not None
    texts = []
    for prompt in prompts:
        if isinstance(prompt, str) and not chat_template:
            texts.append(prompt)
            continue
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_token_ids = model.generation_config.eos_token_id
    eos_token_ids = set(
        eos_token_ids if isinstance(eos_token_ids, list) else [eos_token_ids] if eos_token_ids is not None else []
    )
    eos_token_ids.add(tokenizer.eos_token_id)

    rows = {"input_ids": [], "completion_mask": []}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(texts), batch_size):
            # A chat template writes its own special tokens.
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not chat_template,
            ).to(model.device)
            with model.otter_disabled() if hasattr(model, "otter_disabled") else contextlib.nullcontext():
                generated = model.generate(
                    **batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id
                )
            prompt_length = batch["input_ids"].shape[1]
            for mask, sequence in zip(batch["attention_mask"].tolist(), generated.tolist()):
                prompt = [token for token, real in zip(sequence[:prompt_length], mask) if real]
                completion = sequence[prompt_length:]
                end = next(
                    (index + 1 for index, token in enumerate(completion) if token in eos_token_ids), len(completion)
                )
                completion = completion[:end]
                rows["input_ids"].append(prompt + completion)
                rows["completion_mask"].append([0] * len(prompt) + [1] * len(completion))
    finally:
        tokenizer.padding_side = padding_side
    return Dataset.from_dict(rows)
