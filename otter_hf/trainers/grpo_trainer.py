"""Online RL with the Otter reward riding on the policy's own frozen base: TRL's `GRPOTrainer` with one model in
memory for policy, reference and reward.

The policy trains through a PEFT adapter on the base of an Otter model. With the adapter disabled, that base is
exactly the base the Otter reward was trained on, so:

- the reference log-probabilities (`beta > 0`) come from the adapter-disabled forward, as in TRL, with the inserted
  stream switched on: the same forward gives the Otter value at each completion's last token, the reward, for the
  cost of the inserted stream alone (the original logits, and so the reference log-probabilities, are the base's
  bit for bit);
- with `beta == 0`, or when the reference is not the bare base (a pre-trained adapter, for which TRL keeps a "ref"
  copy of it), the reward costs one adapter-disabled forward of the scoring batch and no extra memory;
- the policy generates and computes its training log-probabilities with the inserted stream switched off
  (`otter_disabled()`), at the cost TRL's own forwards have;
- Otter's inserted parameters stay frozen: they are the reward.

Full fine-tuning of the policy would move the very base the reward reads, so this trainer refuses it: for that, give
TRL's `GRPOTrainer` a frozen copy of the Otter model as `reward_funcs=otter_hf.sequence_classification_view(copy)`,
as TRL keeps a frozen copy of the policy as its reference.
"""

import copy
import os
import re

import torch
from accelerate.utils import is_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import pad

from ..lifecycle.insertion import load_otter
from ..modeling import sequence_classification_view
from ..modeling.inserted_heads import PEFT_EXCLUDE_MODULES, is_inserted_parameter
from ..modeling.modeling_otter import OtterForCausalLMMixin
from ..modeling.sequence_classification import pool_last_token
from .distributed import OtterTrainerMixin
from .grpo_config import OtterGRPOConfig
from .safeguards import StopOnNonFiniteGradientCallback
from .utils import check_otter_model

# Files a tokenizer saved beside a checkpoint is written to; one of them means the checkpoint names its tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class OtterGRPOTrainer(OtterTrainerMixin, GRPOTrainer):
    """TRL's [`~trl.GRPOTrainer`] whose first reward is the Otter value of the policy's own frozen base.

    The reward of a completion is the value head's prediction at its last token, read from the inserted stream of
    the base under the policy's adapter: the sequence value `OtterRewardTrainer` trains. It is scored on what TRL's
    reward models score: for conversational prompts, the completion closed as the chat template closes an assistant
    turn (SmolLM2's `<|im_end|>` and a newline, those of them the completion did not generate), as in the
    preference pairs the reward was trained on; for plain-text prompts, the completion as generated. Other
    `reward_funcs` (functions, reward models, checkpoint paths) combine with it as in TRL.

    Args:
        model (`str`, Otter model or `PeftModel`):
            The policy's starting point: an Otter causal LM holding the reward (from `otter_hf.insert` and
            `OtterRewardTrainer`, or loaded with `AutoModelForCausalLM`), the path of a saved one, a `PeftModel`
            wrapping one, or, with `args.otter_reward_path`, the base model (or its path) the reward's inserted
            parameters are attached to.
        reward_funcs (*optional*):
            More rewards, as TRL's `reward_funcs`; an Otter causal LM among them is scored through its
            sequence-classification view.
        args ([`OtterGRPOConfig`], *optional*):
            Training configuration.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The policy's tokenizer, which is also the reward's: the reward reads the policy's token ids.
        peft_config ([`~peft.PeftConfig`], *optional*):
            The adapter the policy trains through (needed unless `model` is a `PeftModel` already). It must leave
            Otter's inserted modules alone.
        **kwargs:
            The other arguments of [`~trl.GRPOTrainer`].
    """

    _tag_names = ["trl", "grpo", "otter"]

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else (model.name_or_path or "otter")
            args = OtterGRPOConfig(f"{name.rstrip('/').split('/')[-1]}-GRPO")
        reward_path = getattr(args, "otter_reward_path", None)
        model = _load_policy(model, args, reward_path)
        otter = model.get_base_model() if is_peft_model(model) else model
        check_otter_model(otter, type(self).__name__)
        if peft_config is None and not is_peft_model(model):
            raise ValueError(
                "OtterGRPOTrainer reads the reward from the policy's own base, so the policy must train through a "
                "PEFT adapter that leaves that base frozen: pass `peft_config=peft.LoraConfig(...)` (or a "
                "`PeftModel`). "
                "To fine-tune every weight of the policy instead, use TRL's `GRPOTrainer` with a frozen copy of the "
                "Otter model as the reward, `reward_funcs=otter_hf.sequence_classification_view(copy)`."
            )
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                otter.name_or_path, padding_side="left", truncation_side="left"
            )
        _check_tokenizer(processing_class, otter, reward_path)

        def otter_value(prompts, completions, completion_ids, **_):
            return self._otter_rewards(len(prompts))

        extra_rewards = (
            reward_funcs if isinstance(reward_funcs, list) else [] if reward_funcs is None else [reward_funcs]
        )
        for reward in extra_rewards:
            if reward is model or reward is otter:
                raise ValueError(
                    "The policy's own Otter reward is already the first reward of OtterGRPOTrainer; leave the model "
                    "out of `reward_funcs`."
                )
        extra_rewards = [
            sequence_classification_view(reward) if isinstance(reward, OtterForCausalLMMixin) else reward
            for reward in extra_rewards
        ]
        if peft_config is not None:
            peft_config = _excluding_inserted_modules(peft_config)
        # Every adapter parameter gets a gradient from the policy's forward: DDP need not search for unused ones.
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False
        # Set before the Trainer is built: its checkpoint hooks read them.
        self.otter_model = otter
        self._reward_view = sequence_classification_view(otter)
        self._values_from_reference = None
        self._rollout_token_ids = None
        self._turn_closing_ids = None  # set from the first prompts: the chat template's end of an assistant turn
        super().__init__(
            model=model,
            reward_funcs=[otter_value, *extra_rewards],
            args=args,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        self._peft_model = self.accelerator.unwrap_model(self.model)
        trained_inserted = [
            name for name, p in self._peft_model.named_parameters() if p.requires_grad and is_inserted_parameter(name)
        ]
        if trained_inserted:
            raise ValueError(
                f"The adapter trains Otter's inserted parameters ({', '.join(trained_inserted[:3])}"
                f"{', ...' if len(trained_inserted) > 3 else ''}), which are the reward and must stay frozen. Keep "
                "the inserted modules out of `modules_to_save` and out of the adapter (pass `peft_config` to this "
                "trainer rather than a `PeftModel` wrapped beforehand: it leaves them out)."
            )
        self.add_callback(StopOnNonFiniteGradientCallback)

    # -- where the inserted stream runs ------------------------------------------------------------------------

    def _generate(self, prompts: list):
        if self._turn_closing_ids is None:
            self._turn_closing_ids = (
                turn_closing_ids(self._tokenizer, prompts[0], **self.chat_template_kwargs)
                if is_conversational({"prompt": prompts[0]})
                else []
            )
        with self.otter_model.otter_disabled():
            generated = super()._generate(prompts)
        self._rollout_token_ids = generated[0], generated[1]  # prompt ids, completion ids: what the reward reads
        return generated

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if not self._reads_reward_in_this_forward():
            with self.otter_model.otter_disabled():
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
                )
        values = []

        def read_value(backbone, inputs, inputs_kwargs, outputs):
            value = self.otter_model.v_head(outputs.inserted_last_hidden_state)
            values.append(pool_last_token(value, inputs_kwargs.get("attention_mask")))

        # The turn's closing tokens follow each completion, so the completion's own log-probabilities are those of
        # the sequence without them; the extra positions are dropped from what TRL gets back.
        input_ids, attention_mask, closing_width = self._with_turn_closed(input_ids, attention_mask)
        hook = self.otter_model.base_model.register_forward_hook(read_value, with_kwargs=True)
        try:
            logps, entropies, *rest = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep + closing_width, *args, **kwargs
            )
        finally:
            hook.remove()
        self._values_from_reference = torch.cat(values)
        kept = slice(0, logits_to_keep)
        return (logps[:, kept], None if entropies is None else entropies[:, kept], *rest)

    def _with_turn_closed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """`input_ids` (left-padded prompts, right-padded completions) with the turn's closing tokens each completion
        lacks written after its last token, `attention_mask` covering them, and the number of columns added."""
        closings = [self._closing_to_append(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask)]
        closing_width = max(map(len, closings), default=0)
        if closing_width == 0:
            return input_ids, attention_mask, 0
        columns = (input_ids.shape[0], closing_width)
        input_ids = torch.cat([input_ids, input_ids.new_full(columns, self._tokenizer.pad_token_id)], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(columns)], dim=1)
        ends = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)  # each row's last attended position
        for row, (end, closing) in enumerate(zip(ends.tolist(), closings)):
            input_ids[row, end + 1 : end + 1 + len(closing)] = torch.tensor(closing, dtype=input_ids.dtype)
            attention_mask[row, end + 1 : end + 1 + len(closing)] = 1
        return input_ids, attention_mask, closing_width

    def _closing_to_append(self, token_ids: list[int]) -> list[int]:
        """The turn's closing tokens that `token_ids` does not end with already (a completion that generated the
        end-of-turn token lacks only what follows it)."""
        closing = self._turn_closing_ids or []
        generated = next((size for size in range(len(closing), 0, -1) if token_ids[-size:] == closing[:size]), 0)
        return closing[generated:]

    def _reads_reward_in_this_forward(self) -> bool:
        """Whether this log-probability forward is the reference's on the bare base, which then also gives the
        reward. A truncated completion masked out of the attention (`mask_truncated_completions`) would be scored
        without its tokens there, so those runs read the reward in a forward of their own."""
        return (
            not torch.is_grad_enabled()
            and getattr(self, "_peft_model", None) is not None
            and self._peft_model._adapters_disabled
            and not self.mask_truncated_completions
        )

    # -- the reward --------------------------------------------------------------------------------------------

    def _otter_rewards(self, num_completions: int) -> list[float]:
        values, self._values_from_reference = self._values_from_reference, None
        if values is None:
            values = self.otter_values(*self._rollout_token_ids)
        if len(values) != num_completions:
            raise RuntimeError(
                f"The Otter reward scored {len(values)} completions where {num_completions} were generated."
            )
        return values.float().tolist()

    @torch.no_grad()
    def otter_values(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
        """The Otter reward of each completion: the value at its last token under the bare base, on the sequences
        TRL builds (left-padded prompt, right-padded completion, closed as the chat template closes a turn), in one
        adapter-disabled forward per batch."""
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        completions = [torch.tensor(ids + self._closing_to_append(ids)) for ids in completion_ids]
        sides = (("left", prompts), ("right", completions))
        input_ids = torch.cat([pad(rows, pad_id, side, self.pad_to_multiple_of) for side, rows in sides], dim=1)
        attention_mask = torch.cat(
            [pad([torch.ones_like(row) for row in rows], 0, side, self.pad_to_multiple_of) for side, rows in sides],
            dim=1,
        )
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        batch_size = (
            self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        )
        values = []
        # Under the same autocast as TRL's reference forward, so both ways of reading the reward give one number.
        with self._peft_model.disable_adapter(), self.accelerator.autocast():
            for start in range(0, len(input_ids), batch_size):
                rows = slice(start, start + batch_size)
                values.append(self._reward_view(input_ids[rows], attention_mask=attention_mask[rows]).logits[:, 0])
        return torch.cat(values)

    # -- checkpoints: the adapter, never the frozen base nor the reward ----------------------------------------------

    def save_checkpoint_weights(self, output_dir: str) -> None:
        self._peft_model.save_pretrained(output_dir)


def turn_closing_ids(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], **chat_template_kwargs) -> list[int]:
    """The token ids the chat template writes after an assistant message's content, the message ending the
    conversation `prompt` starts (SmolLM2: `<|im_end|>` and a newline), rendered as TRL renders what its reward
    models score."""
    marker = "OtterCompletionMarker"
    conversation = {"messages": [*prompt, {"role": "assistant", "content": marker}]}
    text = apply_chat_template(conversation, tokenizer, **chat_template_kwargs)["text"]
    if marker not in text:
        raise ValueError(
            "The tokenizer's chat template drops the assistant's message, so the Otter reward cannot score a "
            "completion as a closed turn: give the trainer a tokenizer whose template renders assistant turns."
        )
    return tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)["input_ids"]


def _load_policy(model, args, reward_path: str | None):
    """The policy as given, loaded from its path, or the base with the reward at `reward_path` attached."""
    if isinstance(model, str):
        model_init_kwargs = dict(args.model_init_kwargs or {})
        args.model_init_kwargs = None  # used here; GRPOTrainer would warn that a loaded model ignores them
        model = AutoModelForCausalLM.from_pretrained(model, **model_init_kwargs)
    if reward_path is None:
        return model
    if is_peft_model(model):
        raise ValueError(
            "`otter_reward_path` attaches the reward to the base model before the adapter wraps it: pass the base "
            "model (or its path) with `peft_config`, not a `PeftModel`."
        )
    if isinstance(model, OtterForCausalLMMixin):
        raise ValueError(
            "`otter_reward_path` attaches a reward to a base model, but the model is an Otter model already (it holds "
            "its own reward); pass its base, or leave `otter_reward_path` unset."
        )
    return load_otter(model, reward_path)


def _excluding_inserted_modules(peft_config):
    """A copy of `peft_config` that leaves Otter's inserted modules alone: the inserted attention has its own
    `o_proj` and `qkv_proj`, which `target_modules` naming the base's would otherwise catch too."""
    if not hasattr(peft_config, "exclude_modules"):
        return peft_config
    inserted = PEFT_EXCLUDE_MODULES
    excluded = peft_config.exclude_modules
    if excluded:
        # PEFT matches a string as a regular expression on the whole module name, and a list by name suffix.
        names = [excluded] if isinstance(excluded, str) else [rf"(.*\.)?{re.escape(name)}" for name in excluded]
        inserted = "|".join(f"(?:{pattern})" for pattern in [*names, inserted])
    peft_config = copy.deepcopy(peft_config)
    peft_config.exclude_modules = inserted
    return peft_config


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, otter, reward_path: str | None) -> None:
    """The reward reads the policy's token ids, so the reward must have been trained with the policy's tokenizer."""
    vocabulary_size = otter.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocabulary_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model embeds {vocabulary_size}: it is not the "
            "tokenizer of this model. Pass the tokenizer the base model and its Otter reward were trained with."
        )
    for folder in (reward_path, otter.name_or_path):
        if not (folder and os.path.isdir(folder)):
            continue
        if not any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
            continue
        saved = AutoTokenizer.from_pretrained(folder)
        if saved.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"The tokenizer passed to the trainer differs from the one saved with the reward in {folder} (their "
                "vocabularies differ). The Otter reward reads the policy's token ids, so both must be the tokenizer "
                f"the reward was trained with: pass `processing_class=AutoTokenizer.from_pretrained({folder!r})`."
            )


__all__ = ["OtterGRPOTrainer"]
