"""The heads that read the final streams of an Otter model, and the one registry that declares them.

Every head is declared once, by an `InsertedHead` entry in `INSERTED_HEADS`: its config fields (which are also
`otter_hf.insert` keyword arguments and `otter-hf` command-line options), when the config builds it, how
`otter_hf.insert` initialises it, whether it stays in float32, and the output field its prediction fills. The
config class, the causal LM (construction, parameter names, float32 modules, forward, output dataclass), the
initialisation and the command line all read this registry; none of them names a head.

To add a head: write its module (a `nn.Module` built from the config, with `initialize` and `predict`) and add
one `InsertedHead` entry.

This file imports only torch and transformers, so it ships with a checkpoint as remote code.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadOption:
    """A config field of an inserted head; `otter_hf.insert` takes it as a keyword argument and the command line
    as `--name-with-dashes`."""

    name: str
    type: type
    default: object
    help: str
    # What a valid value is, in words for the error message, and the check itself.
    requirement: str
    is_valid: Callable[[object], bool]


@dataclass(frozen=True)
class InsertedHead:
    """One head on the final streams, declared once."""

    # The head's attribute on the causal LM, and so the first component of its parameter names.
    attribute: str
    # Built as `module_class(config)`; it must provide `initialize(method, config)` and `predict(streams)`.
    module_class: type[nn.Module]
    options: tuple[HeadOption, ...]
    # Whether a config builds the head; where it does not, the attribute is None and its output stays None.
    is_built: Callable[[object], bool]
    # The field of `OtterCausalLMOutputWithValue` that `predict` fills, with its docstring entry.
    output_field: str
    output_doc: str
    # False: the forward computes the output only when called with `output_<output_field>=True`.
    computed_by_default: bool
    # Loaded and kept in float32 whatever the model's dtype (transformers' `_keep_in_fp32_modules_strict`).
    keep_in_fp32: bool
    # What the head is, in words, for error messages.
    description: str

    @property
    def request_argument(self) -> str:
        """The forward keyword argument that asks for an output computed only on request."""
        return f"output_{self.output_field}"


@dataclass
class FinalStreams:
    """What the heads read after the final norm of the decoder."""

    hidden_states: torch.Tensor  # the original stream, every position
    inserted_hidden_states: torch.Tensor  # the inserted stream, every position
    logits: torch.Tensor  # the LM head's logits at the positions `logits_to_keep` keeps
    logits_to_keep: int | torch.Tensor
    # Final original-stream hidden states -> the base model's logits (the LM head and the architecture's own
    # output processing, such as softcapping).
    logits_from_hidden: Callable[[torch.Tensor], torch.Tensor]
    # The token ids the streams were computed from (None for `inputs_embeds`), and token ids -> the rows of the
    # base model's input embedding matrix.
    input_ids: torch.LongTensor | None = None
    token_embeddings: Callable[[torch.LongTensor], torch.Tensor] | None = None

    def kept(self, states: torch.Tensor) -> torch.Tensor:
        """`states` at the positions the LM head's logits were computed for (an int keeps that many last
        positions, 0 all of them; a tensor holds the positions), as every causal LM of transformers reads it."""
        keep = self.logits_to_keep
        return states[:, slice(-keep, None) if isinstance(keep, int) else keep]


def initialize_linear(linear: nn.Linear, method: str, std: float) -> None:
    """`"random"`: PyTorch's default initialisation; otherwise N(0, std) weights and zero bias."""
    if method == "random":
        linear.reset_parameters()
        return
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class OtterValueHead(nn.Module):
    """Maps the final inserted stream to one float32 value per token (the old TRL `v_head.summary` layout)."""

    def __init__(self, config):
        super().__init__()
        self.dropout = nn.Dropout(config.value_head_dropout)
        self.summary = nn.Linear(config.inserted_hidden_size, 1)

    def forward(self, inserted_hidden: torch.Tensor) -> torch.Tensor:
        inserted_hidden = self.dropout(inserted_hidden.to(self.summary.weight.dtype))
        return self.summary(inserted_hidden).squeeze(-1).to(torch.float32)

    def initialize(self, method: str, config) -> None:
        # "copy" has no original value head to copy from, so it starts like "normal".
        initialize_linear(self.summary, method, config.initializer_range)

    def predict(self, streams: FinalStreams) -> torch.Tensor:
        # Every position, whatever `logits_to_keep`: trainers and guided decoding read the value of every prefix.
        return self(streams.inserted_hidden_states)


class OtterDraftHeads(nn.Module):
    """Medusa-style draft heads on both final streams, decoded by the frozen LM head.

    Head k turns `[h, g]` at position t into a hidden state `h + SiLU(W_k [h, g])` whose LM-head logits predict
    the token at t + k + 2 (the LM head itself predicts t + 1).
    """

    def __init__(self, config):
        super().__init__()
        input_size = config.hidden_size + config.inserted_hidden_size
        self.layers = nn.ModuleList(nn.Linear(input_size, config.hidden_size) for _ in range(config.num_draft_heads))
        self.act_fn = nn.SiLU()

    def forward(self, hidden: torch.Tensor, inserted_hidden: torch.Tensor) -> torch.Tensor:
        """Draft hidden states, shape (..., num_draft_heads, hidden_size)."""
        joined = torch.cat([hidden, inserted_hidden], dim=-1)
        return torch.stack([hidden + self.act_fn(layer(joined)) for layer in self.layers], dim=-2)

    def initialize(self, method: str, config) -> None:
        # As in Medusa, whatever the method: every head starts out repeating the LM head's own prediction.
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def predict(self, streams: FinalStreams) -> torch.Tensor:
        hidden, inserted = streams.kept(streams.hidden_states), streams.kept(streams.inserted_hidden_states)
        return streams.logits_from_hidden(self(hidden, inserted))


class OtterRecurrentDraftHead(nn.Module):
    """A draft head that drafts one token after another from the features it predicts (EAGLE / Hydra-style).

    Where Medusa head k guesses the token at t + k + 2 from position t alone, this head knows the tokens before the
    one it drafts: from the final hidden state `h_t` and the embedding of the token at t + 1 it predicts the next
    hidden state, `f = h_t + down(SiLU(up(norm([h_t, e_(t+1)]))))`, whose logits propose the token at t + 2; the
    next step reads `f` and the embedding of that draft, and so on. It reads the original stream only, so the
    verification forwards of speculative decoding run the base computation alone.

    Its logits cover a draft vocabulary, the `draft_vocab_size` tokens most frequent in the training data (fitted
    by `OtterDraftTrainer`, ids in `draft_token_ids`), through its own LM head initialised from the base one's
    rows: on a small model the full LM head costs a fifth of a forward per draft.
    """

    def __init__(self, config):
        super().__init__()
        hidden_size = config.hidden_size
        draft_vocab_size = min(config.draft_vocab_size, config.vocab_size)
        self.norm = nn.RMSNorm(2 * hidden_size, eps=1e-6)
        # The base model's MLP width (GPT-2 names it n_inner, None meaning 4x).
        intermediate_size = (
            getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden_size
        )
        self.up_proj = nn.Linear(2 * hidden_size, intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size)
        self.act_fn = nn.SiLU()
        self.lm_head = nn.Linear(hidden_size, draft_vocab_size, bias=False)
        self.register_buffer("draft_token_ids", torch.arange(draft_vocab_size), persistent=True)

    def step(self, features: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        """The predicted final hidden state one position on, from the features at a position and the embedding
        of the token after it."""
        joined = torch.cat([features, token_embeddings.to(features.dtype)], dim=-1)
        return features + self.down_proj(self.act_fn(self.up_proj(self.norm(joined))))

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (`draft_token_ids[i]` is entry i's token id)."""
        return self.lm_head(features)

    def initialize(self, method: str, config) -> None:
        # Whatever the method: the first step starts as the identity, and the draft vocabulary as the first ids,
        # until `OtterDraftTrainer` fits it (copying the base LM head's rows).
        self.norm.reset_parameters()
        initialize_linear(self.up_proj, method, config.initializer_range)
        initialize_linear(self.lm_head, method, config.initializer_range)
        nn.init.zeros_(self.down_proj.weight)
        nn.init.zeros_(self.down_proj.bias)
        self.draft_token_ids.copy_(torch.arange(self.draft_token_ids.shape[0]))

    def is_vocabulary_fitted(self) -> bool:
        """Whether training data chose the draft vocabulary: False while it is still the initial one (the first ids)."""
        return not torch.equal(self.draft_token_ids.cpu(), torch.arange(self.draft_token_ids.shape[0]))

    def predict(self, streams: FinalStreams) -> torch.Tensor:
        if streams.input_ids is None:
            raise ValueError(
                "The recurrent draft head reads the next token's embedding: call the model with `input_ids`."
            )
        # Teacher-forced first steps: position t reads the token at t + 1, so the last position has none.
        next_embeddings = streams.token_embeddings(streams.input_ids[:, 1:])
        return self.draft_logits(self.step(streams.hidden_states[:, :-1], next_embeddings))


class OtterTokenRewardHead(nn.Module):
    """GenARM's autoregressive reward inside the LLM's own forward: reward logits over the whole vocabulary.

    The reward logits at position t are the original logits plus `W_r g_t`, where `g_t` is the final inserted
    stream and `W_r` (vocab_size x inserted_hidden_size) starts at zero, so the reward policy
    `pi_r = softmax(reward logits)` starts as the base policy, where GenARM starts its reward model. A full
    `W_r` costs `inserted_hidden_size` multiply-adds per vocabulary entry and token (a rank no higher than the
    inserted stream's width anyway), against the LM head's `hidden_size`.
    """

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.inserted_hidden_size, config.vocab_size, bias=False)

    def forward(self, logits: torch.Tensor, inserted_hidden: torch.Tensor) -> torch.Tensor:
        return logits + self.proj(inserted_hidden.to(self.proj.weight.dtype)).to(logits.dtype)

    def initialize(self, method: str, config) -> None:
        # Whatever the method: the reward policy starts as the base policy, as GenARM's reward model does.
        nn.init.zeros_(self.proj.weight)

    def predict(self, streams: FinalStreams) -> torch.Tensor:
        # Only where the LM head's logits were computed: prefill of a long prompt builds no (seq x vocab) tensor.
        return self(streams.logits, streams.kept(streams.inserted_hidden_states))


class OtterExpertHead(OtterTokenRewardHead):
    """A DExperts expert (or anti-expert) inside the LLM's own forward: language-model logits over the whole
    vocabulary, the original logits plus `W g`, with the final inserted stream `g` and `W` starting at zero.

    DExperts (Liu et al., ACL 2021) runs an expert and an anti-expert language model beside the base and decodes
    from `logits + alpha * (expert_logits - anti_expert_logits)`; here each is one projection of the inserted
    stream, so the three sets of logits come from one forward. Both start as the base model, as DExperts' experts
    start from the pretrained model they are fine-tuned from; `OtterExpertTrainer` fits them with the language
    modelling loss on the expert and the anti-expert text.
    """


def _is_probability_below_one(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


def is_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_positive_count(value) -> bool:
    return _is_count(value) and value > 0


# Upper bounds on the counts of heads, well above any use (Medusa drafts 4 tokens ahead, EAGLE 5 to 8), so that a
# crafted config is refused before it builds a million modules.
MAX_DRAFTS = 64
MAX_DRAFT_BATCH_SIZE = 4096


def _is_draft_count(value) -> bool:
    return _is_count(value) and value <= MAX_DRAFTS


INSERTED_HEADS: tuple[InsertedHead, ...] = (
    InsertedHead(
        attribute="v_head",
        module_class=OtterValueHead,
        options=(
            HeadOption(
                name="value_head_dropout",
                type=float,
                default=0.0,
                help="Dropout applied to the inserted stream before the value head (`v_head.summary`).",
                requirement="in [0, 1)",
                is_valid=_is_probability_below_one,
            ),
        ),
        is_built=lambda config: True,
        output_field="value",
        output_doc=(
            "(`torch.FloatTensor` of shape `(batch_size, sequence_length)`):\n"
            "    The calibration signal the inserted parameters predict at every position (float32). None while the\n"
            "    inserted stream is disabled."
        ),
        computed_by_default=True,
        keep_in_fp32=True,
        description="a value head",
    ),
    InsertedHead(
        attribute="draft_heads",
        module_class=OtterDraftHeads,
        options=(
            HeadOption(
                name="num_draft_heads",
                type=int,
                default=0,
                help="Medusa-style draft heads reading both final streams; head k predicts the token k + 1 places "
                "after the next one, for speculative decoding. 0 builds none.",
                requirement=f"an integer from 0 to {MAX_DRAFTS}",
                is_valid=_is_draft_count,
            ),
            HeadOption(
                name="draft_confidence_threshold",
                type=float,
                default=1.0,
                help="Speculative decoding keeps a chain of drafts while each head's probability of its own draft "
                "exceeds this; 1.0 never drafts (plain decoding of the base, the default until "
                "`otter_hf.generation.calibrate_draft_confidence` picks one for trained heads), 0.0 keeps every draft.",
                requirement="in [0, 1]",
                is_valid=is_probability,
            ),
            HeadOption(
                name="draft_max_batch_size",
                type=int,
                default=1,
                help="The largest batch the model's own draft heads draft for; larger batches decode as plain "
                "generate() (drafting off). In a batch a step keeps only the drafts every row accepts, and "
                "`calibrate_draft_confidence` prices batch-1 decoding.",
                requirement=f"an integer from 1 to {MAX_DRAFT_BATCH_SIZE}",
                is_valid=lambda value: _is_positive_count(value) and value <= MAX_DRAFT_BATCH_SIZE,
            ),
        ),
        is_built=lambda config: config.num_draft_heads > 0,
        output_field="draft_logits",
        output_doc=(
            "(`torch.FloatTensor` of shape `(batch_size, sequence_length, num_draft_heads, vocab_size)`, *optional*):\n"
            "    The draft heads' logits, when `output_draft_logits=True`; head k at position t predicts token\n"
            "    t + k + 2."
        ),
        computed_by_default=False,
        keep_in_fp32=False,
        description="draft heads (insert with `num_draft_heads`)",
    ),
    InsertedHead(
        attribute="recurrent_draft_head",
        module_class=OtterRecurrentDraftHead,
        options=(
            HeadOption(
                name="num_recurrent_drafts",
                type=int,
                default=0,
                help="A recurrent (EAGLE / Hydra-style) draft head that drafts up to this many tokens one after "
                "another, each from the last; speculative decoding prefers it to Medusa-style heads. 0 builds none.",
                requirement=f"an integer from 0 to {MAX_DRAFTS}",
                is_valid=_is_draft_count,
            ),
            HeadOption(
                name="draft_vocab_size",
                type=int,
                default=4096,
                help="Tokens the recurrent draft head can propose: the most frequent ones of its training data "
                "(capped at the vocabulary size).",
                requirement="a positive integer",
                is_valid=_is_positive_count,
            ),
        ),
        is_built=lambda config: config.num_recurrent_drafts > 0,
        output_field="recurrent_draft_logits",
        output_doc=(
            "(`torch.FloatTensor` of shape `(batch_size, sequence_length - 1, draft_vocab_size)`, *optional*):\n"
            "    The recurrent draft head's first step, teacher-forced, when `output_recurrent_draft_logits=True`:\n"
            "    at position t, from the hidden state there and the token at t + 1, logits over the draft\n"
            "    vocabulary (`recurrent_draft_head.draft_token_ids`) for the token at t + 2."
        ),
        computed_by_default=False,
        keep_in_fp32=False,
        description="a recurrent draft head (insert with `num_recurrent_drafts`)",
    ),
    InsertedHead(
        attribute="token_reward_head",
        module_class=OtterTokenRewardHead,
        options=(
            HeadOption(
                name="token_reward_head",
                type=bool,
                default=False,
                help="A token-level reward head (GenARM): reward logits over the whole vocabulary, the original logits "
                "plus a zero-initialised projection of the inserted stream, for `generate(token_reward_weight=...)`.",
                requirement="True or False",
                is_valid=lambda value: isinstance(value, bool),
            ),
        ),
        is_built=lambda config: config.token_reward_head,
        output_field="token_reward_logits",
        output_doc=(
            "(`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`, *optional*):\n"
            "    The token-level reward head's logits at the positions `logits_to_keep` keeps, when\n"
            "    `output_token_reward_logits=True`; their log-softmax is the reward policy's log-probability of each\n"
            "    next token."
        ),
        computed_by_default=False,
        keep_in_fp32=False,
        description="a token-level reward head (insert with `token_reward_head=True`)",
    ),
    InsertedHead(
        attribute="expert_head",
        module_class=OtterExpertHead,
        options=(
            HeadOption(
                name="expert_heads",
                type=bool,
                default=False,
                help="DExperts-style expert and anti-expert heads: language-model logits over the whole vocabulary, "
                "each the original logits plus a zero-initialised projection of the inserted stream, for "
                "`generate(expert_weight=...)`.",
                requirement="True or False",
                is_valid=lambda value: isinstance(value, bool),
            ),
        ),
        is_built=lambda config: config.expert_heads,
        output_field="expert_logits",
        output_doc=(
            "(`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`, *optional*):\n"
            "    The expert head's language-model logits at the positions `logits_to_keep` keeps, when\n"
            "    `output_expert_logits=True`."
        ),
        computed_by_default=False,
        keep_in_fp32=False,
        description="expert heads (insert with `expert_heads=True`)",
    ),
    # Built with the expert head, by the same option: DExperts steers by the difference of the two.
    InsertedHead(
        attribute="anti_expert_head",
        module_class=OtterExpertHead,
        options=(),
        is_built=lambda config: config.expert_heads,
        output_field="anti_expert_logits",
        output_doc=(
            "(`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`, *optional*):\n"
            "    The anti-expert head's language-model logits at the positions `logits_to_keep` keeps, when\n"
            "    `output_anti_expert_logits=True`."
        ),
        computed_by_default=False,
        keep_in_fp32=False,
        description="expert heads (insert with `expert_heads=True`)",
    ),
)


# A parameter is inserted when one of its name components is a head's attribute or starts with `inserted_`.
INSERTED_PARAMETER_PATTERN = re.compile(
    rf"(^|\.)({'|'.join(head.attribute for head in INSERTED_HEADS)}|inserted_\w+)(\.|$)"
)


def is_inserted_parameter(name: str) -> bool:
    return INSERTED_PARAMETER_PATTERN.search(name) is not None


# PEFT's `LoraConfig(exclude_modules=PEFT_EXCLUDE_MODULES)`: every inserted module, whose names (`o_proj`,
# `down_proj`, ...) and `nn.Linear` type the usual target lists and `"all-linear"` would otherwise reach.
PEFT_EXCLUDE_MODULES = rf".*{INSERTED_PARAMETER_PATTERN.pattern}.*"


def head_options() -> list[HeadOption]:
    return [option for head in INSERTED_HEADS for option in head.options]


__all__ = [
    "FinalStreams",
    "HeadOption",
    "INSERTED_HEADS",
    "PEFT_EXCLUDE_MODULES",
    "InsertedHead",
    "OtterDraftHeads",
    "OtterExpertHead",
    "OtterRecurrentDraftHead",
    "OtterTokenRewardHead",
    "OtterValueHead",
    "head_options",
    "initialize_linear",
    "is_inserted_parameter",
]
