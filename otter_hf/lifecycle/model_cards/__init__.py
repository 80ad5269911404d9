"""The model card of an Otter repository on the Hugging Face Hub, rendered from `otter_model_card.md`."""

from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).with_name("otter_model_card.md")

OTTER_TAGS = ("otter", "value-head", "reward-model", "reward-guided-decoding")


def otter_model_card(
    config,
    *,
    repo_id: str,
    otter_only: bool,
    num_inserted_parameters: int,
    num_base_parameters: int,
    base_model: str | None = None,
    tokenizer_repo: str | None = None,
    trained_on: str | None = None,
    datasets: Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    overhead: Mapping | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
) -> ModelCard:
    """Render the card of an Otter repository.

    Args:
        config: the Otter config of the uploaded model.
        repo_id: the repository the card describes.
        otter_only: whether the repository holds only the inserted parameters (`save_otter`) rather than a
            full checkpoint.
        num_inserted_parameters, num_base_parameters: parameter counts of the inserted and the original parameters.
        base_model: Hub id of the base model, for the `base_model` metadata and the usage snippet; None when the
            base is not on the Hub.
        tokenizer_repo: where the usage snippet loads the tokenizer from; defaults to `base_model`.
        trained_on: what the value head was trained on, in words.
        datasets: Hub ids of the training datasets, for the metadata.
        metrics: evaluation metrics of the value head, name -> value.
        overhead: the report of `otter_hf.overhead.measure_overhead` (what `otter-hf bench` prints).
        license: license identifier for the metadata (e.g. "apache-2.0").
        tags: extra tags, added to the Otter ones.
    """
    card_data = ModelCardData(
        base_model=base_model,
        # A full checkpoint loads with transformers (trust_remote_code); the inserted parameters need otter_hf.
        library_name="otter-hf" if otter_only else "transformers",
        pipeline_tag="text-generation",
        license=license,
        datasets=list(datasets) if datasets else None,
        tags=list(dict.fromkeys([*OTTER_TAGS, *(["token-level-reward"] if config.token_reward_head else []), *tags])),
    )
    overhead_rows, overhead_settings = _overhead_table(overhead or {})
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        repo_id=repo_id,
        otter_only=otter_only,
        base_model_name=base_model or "<base model>",
        base_model_display=f"[{base_model}](https://huggingface.co/{base_model})"
        if base_model
        else "a local base model",
        tokenizer_repo=tokenizer_repo or base_model or "<base model>",
        model_type=config.model_type,
        base_model_type=config.base_model_type,
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        inserted_hidden_size=config.inserted_hidden_size,
        inserted_num_attention_heads=config.inserted_num_attention_heads,
        inserted_num_key_value_heads=config.inserted_num_key_value_heads,
        inserted_intermediate_size=config.inserted_intermediate_size,
        inserted_init=config.inserted_init,
        heads=_heads_in_words(config),
        token_reward_head=config.token_reward_head,
        drafts=bool(config.num_draft_heads or config.num_recurrent_drafts),
        draft_confidence_threshold=config.draft_confidence_threshold,
        num_inserted_parameters=f"{num_inserted_parameters:,}",
        num_base_parameters=f"{num_base_parameters:,}",
        inserted_parameter_fraction=f"{num_inserted_parameters / num_base_parameters:.2%}",
        trained_on=trained_on,
        metrics=[(name, _format_number(value)) for name, value in (metrics or {}).items()],
        overhead_rows=overhead_rows,
        overhead_settings=overhead_settings,
    )


def _heads_in_words(config) -> str:
    heads = ["value head (`v_head`)"]
    if config.token_reward_head:
        heads.append(
            f"token-level reward head ({config.vocab_size:,} x {config.inserted_hidden_size}, `token_reward_head`)"
        )
    if config.expert_heads:
        heads.append(
            f"expert and anti-expert heads ({config.vocab_size:,} x {config.inserted_hidden_size} each, `expert_head`, "
            "`anti_expert_head`), for `generate(expert_weight=...)`"
        )
    if config.num_draft_heads:
        heads.append(f"{config.num_draft_heads} draft heads (`draft_heads`)")
    if config.num_recurrent_drafts:
        heads.append(
            f"a recurrent draft head drafting up to {config.num_recurrent_drafts} tokens over "
            f"{min(config.draft_vocab_size, config.vocab_size):,} (`recurrent_draft_head`)"
        )
    return ", ".join(heads)


def _overhead_table(report: Mapping) -> tuple[list[tuple[str, str, str]], str]:
    """Rows (measurement, ratio, details) for every measurement of an overhead report that has a ratio,
    and its scalar settings in words."""
    rows = [
        (
            name.replace("_", " "),
            f"{value['ratio']}x",
            ", ".join(
                f"{key.replace('_', ' ')}: {_format_number(item)}" for key, item in value.items() if key != "ratio"
            ),
        )
        for name, value in report.items()
        if isinstance(value, Mapping) and "ratio" in value
    ]
    settings = ", ".join(
        f"{name.replace('_', ' ')} {_format_number(value)}"
        for name, value in report.items()
        if isinstance(value, (str, int, float)) and name != "base_model"
    )
    return rows, settings


def _format_number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


__all__ = ["OTTER_TAGS", "TEMPLATE_PATH", "otter_model_card"]
