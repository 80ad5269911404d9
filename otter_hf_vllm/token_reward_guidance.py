"""Token-level guidance per request: `logits + weight * log_softmax(token_reward_logits)`, from the same forward.

A request asks for it with `SamplingParams(extra_args={"token_reward_weight": weight})` (in the OpenAI server,
`"vllm_xargs": {"token_reward_weight": weight}`); the other requests of the batch keep the base logits.

vLLM hands a logits processor the logits only, so the model and the processor meet in `TOKEN_REWARD_HANDOFF`, in
the process that runs both: before each forward the processor names the batch rows of the guided requests, the
model's `compute_logits` then leaves the token reward logits of those rows, and the processor takes them. The
(rows x vocabulary) reward logits and their log-softmax are computed for the guided rows only, none in an
unguided batch.
"""

import torch
from vllm import SamplingParams
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .otter_hf_files import load_otter_hf_file

logger = init_logger(__name__)

TOKEN_REWARD_WEIGHT = "token_reward_weight"
# otter_hf's bound and check on guidance weights, the same file (`otter_hf/modeling/guidance_weight.py`).
_guidance_weight = load_otter_hf_file("guidance_weight")
MAX_GUIDANCE_WEIGHT = _guidance_weight.MAX_GUIDANCE_WEIGHT


def check_token_reward_weight(weight) -> None:
    """Raise a ValueError unless `weight` is a real number of magnitude at most `MAX_GUIDANCE_WEIGHT` (None: none)."""
    _guidance_weight.check_guidance_weight(TOKEN_REWARD_WEIGHT, weight)


class TokenRewardLogitsHandoff:
    """The guided rows of the next forward, and the token reward logits that its `compute_logits` left for them."""

    def __init__(self):
        # Batch rows of the guided requests (ascending), set by the processor before each forward; None: none.
        self.guided_rows: torch.Tensor | None = None
        self._reward_logits: torch.Tensor | None = None

    def put(self, reward_logits: torch.Tensor) -> None:
        self._reward_logits = reward_logits

    def take(self) -> torch.Tensor | None:
        reward_logits, self._reward_logits = self._reward_logits, None
        return reward_logits


TOKEN_REWARD_HANDOFF = TokenRewardLogitsHandoff()


def token_reward_weight(params: SamplingParams) -> float | None:
    """The request's guidance weight; None when it asks for none (no weight, or 0: the base output)."""
    weight = (params.extra_args or {}).get(TOKEN_REWARD_WEIGHT)
    return None if weight is None or weight == 0 else float(weight)


class TokenRewardGuidanceLogitsProcessor(LogitsProcessor):
    """Adds `weight * log_softmax(token_reward_logits)` to the logits of each request that carries a weight.

    Installed for every model by the `vllm.logits_processors` entry point; with no guided request in the batch it
    returns the logits untouched. It runs before temperature, top-k and top-p, which then act on the guided scores,
    as in otter_hf's `generate(token_reward_weight=...)`.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        hf_config = vllm_config.model_config.hf_config
        # Only an Otter model built with a token reward head hands over reward logits.
        self.model_has_token_reward_head = bool(getattr(hf_config, "token_reward_head", False)) and any(
            architecture.startswith("Otter") for architecture in (hf_config.architectures or ())
        )
        self.weights: dict[int, float] = {}  # batch row -> weight
        self.device = device
        self.batch_size = 0
        # The guided rows ascending and their weights in that order, rebuilt when the batch changes.
        self.guided_rows: torch.Tensor | None = None
        self.guided_weights: torch.Tensor | None = None

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        # Run as the request is added: a bad weight fails that request alone (an HTTP 400 in the server).
        check_token_reward_weight((sampling_params.extra_args or {}).get(TOKEN_REWARD_WEIGHT))

    def is_argmax_invariant(self) -> bool:
        return False

    def _weight_of_new_request(self, params: SamplingParams, prompt_token_ids, output_token_ids) -> float | None:
        weight = token_reward_weight(params)
        if weight is not None and not self.model_has_token_reward_head:
            # Raising here would stop the engine for every request; the request decodes from the base logits.
            logger.warning(
                "`%s` is ignored: this model has no token-level reward head (an Otter checkpoint saved with "
                "`token_reward_head=True` has one).",
                TOKEN_REWARD_WEIGHT,
            )
            return None
        return weight

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self.batch_size = batch_update.batch_size
        if process_dict_updates(self.weights, batch_update, self._weight_of_new_request):
            rows = sorted(self.weights)
            self.guided_rows = torch.tensor(rows, device=self.device) if rows else None
            self.guided_weights = torch.tensor(
                [self.weights[row] for row in rows], device=self.device, dtype=torch.float32
            )[:, None]
        TOKEN_REWARD_HANDOFF.guided_rows = self.guided_rows

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.guided_rows is None:
            return logits
        try:
            return self._guide(logits)
        except Exception:
            # An exception here would stop the engine and every request it serves; the guided rows decode from the
            # base logits for this step, and the error is logged.
            logger.exception(
                "Token-reward guidance failed for batch rows %s; they decode from the base logits at this step.",
                self.guided_rows.tolist(),
            )
            return logits

    def _guide(self, logits: torch.Tensor) -> torch.Tensor:
        reward_logits = TOKEN_REWARD_HANDOFF.take()
        expected_shape = (len(self.guided_rows), logits.shape[-1])
        # The guided rows are batch rows, which index the logits only when each request has one logits row.
        if logits.shape[0] != self.batch_size or reward_logits is None or reward_logits.shape != expected_shape:
            raise RuntimeError(
                "Token-reward guidance found no reward logits of this step's guided rows: it needs one logits row per "
                f"request (no speculative decoding); {self.batch_size} requests, logits {tuple(logits.shape)}, "
                f"reward logits {None if reward_logits is None else tuple(reward_logits.shape)}."
            )
        guidance = torch.log_softmax(reward_logits.to(torch.float32), dim=-1).mul_(self.guided_weights)
        return logits.index_add_(0, self.guided_rows, guidance.to(logits.dtype))


__all__ = [
    "MAX_GUIDANCE_WEIGHT",
    "TOKEN_REWARD_HANDOFF",
    "TOKEN_REWARD_WEIGHT",
    "TokenRewardGuidanceLogitsProcessor",
    "check_token_reward_weight",
    "token_reward_weight",
]
