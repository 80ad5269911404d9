"""ARGS reward-guided decoding as a transformers `LogitsProcessor`, with the reward read from the Otter value head."""

import torch
from transformers import DynamicCache, LogitsProcessor

from ..modeling.candidates import (
    candidate_attention_mask,
    check_candidates_attend_by_position,
    check_candidates_can_share_the_prefix,
    check_guidance_model,
    check_within_sliding_window,
    score_candidates,
)
from ..modeling.guidance_weight import check_guidance_weight
from ..modeling.loop_inputs import padding_position_ids


class OtterRewardLogitsProcessor(LogitsProcessor):
    r"""
    Reward-guided decoding (ARGS, Khanov et al. 2024) with the reward an Otter model predicts alongside its tokens.

    At each step the `top_k` best tokens `v` of the scores this processor receives are rescored as
    `score(v) + weight * r(prefix + v)`, where `r` is the Otter value at `v`; every other token gets `-inf`,
    so greedy search takes the best rescored candidate and sampling draws among the candidates.

    The scores are the ones handed over by the processors before this one. `generate()` places processors
    passed in `logits_processor` after its own (repetition penalty, min length, ...) and before the sampling
    warpers (temperature, top-k, top-p), so under sampling the temperature scales the rescored candidates.

    transformers hands a processor only `(input_ids, scores)`, so the processor runs `model` itself: it keeps
    its own cache of the prefix and, per step, runs one forward of the newly generated token followed by the
    `top_k` candidates, which share that cache through a 4D attention mask. Leading `pad_token_id` tokens are
    treated as left padding, as a left-padding tokenizer lays out a batch. For one forward per new token, use
    `model.generate(..., custom_generate=otter_hf.generation.reward_guided_generate)` instead.

    Args:
        model: the Otter model whose value head gives the reward. It may be the model that runs `generate()`,
            or it may guide a base model that shares its original weights.
        weight (`float`): the reward weight `w`, a number of magnitude at most
            `otter_hf.modeling.guidance_weight.MAX_GUIDANCE_WEIGHT`. With 0 the processor leaves the scores untouched
            (guidance off).
        top_k (`int`, *optional*, defaults to 10): how many candidates are rescored per step.
        pad_token_id (`int`, *optional*): the left-padding token; defaults to the model's generation config.

    Example:

    ```python
    >>> from transformers import LogitsProcessorList
    >>> from otter_hf.generation import OtterRewardLogitsProcessor

    >>> guidance = OtterRewardLogitsProcessor(otter_model, weight=1.5, top_k=10)
    >>> output_ids = otter_model.generate(**inputs, logits_processor=LogitsProcessorList([guidance]), max_new_tokens=64)
    ```
    """

    def __init__(self, model, weight: float, top_k: int = 10, pad_token_id: int | None = None):
        check_guidance_weight("weight", weight)
        check_guidance_model(model, top_k)
        if weight != 0:
            check_candidates_can_share_the_prefix(model.config)
        self.model = model
        self.weight = float(weight)
        self.top_k = top_k
        if pad_token_id is None:
            pad_token_id = model.generation_config.pad_token_id
        self.pad_token_id = pad_token_id
        self._cache: DynamicCache | None = None
        self._cached_ids: torch.LongTensor | None = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.weight == 0:
            return scores
        candidate_scores, candidates = scores.topk(self.top_k, dim=-1)
        values = self._candidate_values(input_ids, candidates)
        guided_scores = candidate_scores + self.weight * values.to(candidate_scores.dtype)
        return torch.full_like(scores, float("-inf")).scatter(-1, candidates, guided_scores)

    def _candidate_values(self, input_ids: torch.LongTensor, candidates: torch.LongTensor) -> torch.Tensor:
        check_within_sliding_window(self.model.config, input_ids.shape[1] + self.top_k)
        check_candidates_attend_by_position(self.model.config)
        if not self._continues_cached_prefix(input_ids):
            self._cache = DynamicCache(config=self.model.config)
            self._cached_ids = input_ids[:, :0]
        past_length = self._cached_ids.shape[1]
        device = self.model.device

        if self.pad_token_id is None:
            padding_mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            padding_mask = (input_ids != self.pad_token_id).cumsum(-1) > 0
        position_ids = padding_position_ids(padding_mask)
        candidate_positions = (position_ids[:, -1:] + 1).expand(-1, self.top_k)

        tokens = torch.cat([input_ids[:, past_length:], candidates], dim=-1)
        positions = torch.cat([position_ids[:, past_length:], candidate_positions], dim=-1)
        attention_mask = candidate_attention_mask(
            padding_mask, input_ids.shape[1] - past_length, self.top_k, self.model.dtype
        )
        _, values = score_candidates(
            self.model, tokens.to(device), attention_mask.to(device), positions.to(device), self._cache
        )
        # The candidates were only probes: the cache keeps the prefix alone.
        self._cache.crop(-self.top_k)
        self._cached_ids = input_ids
        return values[:, -self.top_k :].to(input_ids.device)

    def _continues_cached_prefix(self, input_ids: torch.LongTensor) -> bool:
        """Whether `input_ids` extends the prefix in the cache (the same generate() call, one step later)."""
        cached = self._cached_ids
        return (
            cached is not None
            and cached.shape[0] == input_ids.shape[0]
            and cached.shape[1] < input_ids.shape[1]
            and torch.equal(input_ids[:, : cached.shape[1]], cached)
        )
