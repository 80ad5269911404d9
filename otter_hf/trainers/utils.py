"""The checks the Otter trainers share: the model is an Otter model, a dataset has the columns a trainer takes
(with the help strings their errors give), and a dataset that loses rows to `max_length` says so."""

from transformers.utils import logging
from trl.data_utils import get_dataset_column_names

from ..modeling.modeling_otter import OtterForCausalLMMixin

logger = logging.get_logger(__name__)

PREFERENCE_COLUMNS_HELP = (
    "`chosen` and `rejected` (text, or lists of chat messages), optionally `prompt` (explicit prompt, same kind "
    "as `chosen`) and `margin` (a number); or already tokenized `chosen_ids` and `rejected_ids`"
)
SEQUENCE_COLUMNS_HELP = "`completion` and `label` (one number per row), optionally `prompt`"
STEP_COLUMNS_HELP = "`prompt`, `completions` (a list of steps) and `labels` (one number per step)"
TOKEN_REWARD_COLUMNS_HELP = (
    "`chosen` and `rejected` (text, or lists of chat messages), optionally `prompt` (explicit prompt, same kind as "
    "`chosen`; without it the shared start of chosen and rejected is the prompt); or already tokenized "
    "`prompt_ids`, `chosen_ids` and `rejected_ids`"
)
DRAFT_COLUMNS_HELP = "`text` (plain text), or `input_ids` (token ids) with an optional `completion_mask`"


def check_otter_model(model, trainer_name: str) -> None:
    if not isinstance(model, OtterForCausalLMMixin):
        raise TypeError(
            f"{trainer_name} trains the inserted parameters of an Otter model, but got a {type(model).__name__}. "
            "Build one with `otter_hf.insert(base_model)` or load a saved Otter checkpoint with "
            "`AutoModelForCausalLM.from_pretrained(path)` after `import otter_hf`."
        )


def check_preference_columns(
    dataset,
    dataset_name: str,
    tokenized_columns: tuple[set[str], ...] = (
        {"chosen_ids", "rejected_ids"},
        {"chosen_input_ids", "rejected_input_ids"},
    ),
    columns_help: str = PREFERENCE_COLUMNS_HELP,
) -> None:
    """Fail before any tokenisation when the columns do not make a preference dataset (or one of the
    `tokenized_columns` sets)."""
    columns = set(get_dataset_column_names(dataset))
    if any(tokenized <= columns for tokenized in tokenized_columns):
        return
    missing = sorted({"chosen", "rejected"} - columns)
    if missing:
        raise ValueError(
            f"The {dataset_name} dataset has no {', '.join(f'`{name}`' for name in missing)} column; a preference "
            f"dataset needs {columns_help}. Its columns are {sorted(columns)}."
        )
    example = next(iter(dataset))
    texts = {name: example[name] for name in ("prompt", "chosen", "rejected") if name in example}
    kinds = {
        name: "text" if isinstance(text, str) else "messages" if isinstance(text, list) else None
        for name, text in texts.items()
    }
    if None in kinds.values() or len(set(kinds.values())) > 1:
        found = ", ".join(f"`{name}`: {type(text).__name__}" for name, text in texts.items())
        raise ValueError(
            f"In the {dataset_name} dataset, `prompt`, `chosen` and `rejected` must all be text or all be lists of "
            f"chat messages; the first row has {found}."
        )
    if "margin" in example and not isinstance(example["margin"], (int, float)):
        raise ValueError(
            f"The `margin` column of the {dataset_name} dataset must hold numbers; the first row has "
            f"{type(example['margin']).__name__}."
        )


def check_dataset_not_empty(dataset, dataset_name: str) -> None:
    if num_rows(dataset) == 0:
        raise ValueError(f"The {dataset_name} dataset is empty: give it at least one row.")


def check_rows_kept(
    num_rows_before: int | None, dataset, dataset_name: str, max_length: int | None, what_is_dropped: str
) -> None:
    """Fail when no row of a dataset fits `max_length`, and warn with the count when some were dropped."""
    num_rows_after = num_rows(dataset)
    if num_rows_before is None or num_rows_after is None or num_rows_after == num_rows_before:
        return
    if num_rows_after == 0:
        raise ValueError(
            f"No row of the {dataset_name} dataset fits max_length={max_length}: all {num_rows_before} were dropped "
            f"({what_is_dropped}). Raise max_length or shorten the rows."
        )
    logger.warning(
        f"Dropped {num_rows_before - num_rows_after} of the {num_rows_before} rows of the {dataset_name} dataset "
        f"({what_is_dropped}); {num_rows_after} are kept. Raise max_length to keep them."
    )


def num_rows(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an IterableDataset: its rows are not counted ahead
        return None
