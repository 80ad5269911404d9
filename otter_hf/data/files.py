"""Reading a dataset from a local file (JSON lines, JSON, CSV, Parquet) or the Hub, with errors that name the file and
the option it came from, and the rows of one split of a file with a `split` column (as the bundled sets have)."""

import os

from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError


def load_dataset_file(path_or_id: str, split: str, option: str):
    """A local data file (the rows of `split` when it has a `split` column) or the `split` of a Hub dataset; errors
    name `option`, where the path came from."""
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    extension = os.path.splitext(path_or_id)[1].lower()
    if extension not in builders:
        return load_dataset(path_or_id, split=split)
    if not os.path.isfile(path_or_id):
        raise FileNotFoundError(f"{option}: no dataset file at {path_or_id}.")
    try:
        dataset = load_dataset(builders[extension], data_files=path_or_id, split="train")
    except StopIteration:  # what the json builder raises on a file without a row
        raise ValueError(f"{option}: {path_or_id} holds no rows; it needs at least one.") from None
    except DatasetGenerationError as error:
        raise ValueError(
            f"{option}: {path_or_id} cannot be read as a {extension} file ({error.__cause__ or error}). "
            + ("Each line must be one JSON object." if extension == ".jsonl" else "Fix or replace the file.")
        ) from None
    if "split" not in dataset.column_names:
        return dataset
    splits = sorted(set(dataset["split"]))
    if split not in splits:
        raise ValueError(f"{option}: {path_or_id} has no rows of split {split!r}; its `split` column holds {splits}.")
    return dataset.filter(lambda row: row["split"] == split).remove_columns("split")
