"""Otter models on the Hugging Face Hub: one-commit uploads with an Otter model card, and inserted-only repos.

Two kinds of repository:

- a full checkpoint (`save_pretrained`): weights, config, the modeling files and an `auto_map`, so it loads
  with `AutoModelForCausalLM.from_pretrained(repo_id)` after `import otter_hf`, or with
  `trust_remote_code=True` where otter_hf is not installed;
- the inserted parameters only (`save_otter`, a few MB): they name their base model, and
  `otter_hf.load_otter(None, repo_id)` fetches that base and attaches them, refusing a base whose weights differ.

transformers' own `push_to_hub` writes a generic model card; here the checkpoint, its files and our card go up
together in a single commit.
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence

import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..modeling import OTTER_CLASSES_BY_BASE_MODEL_TYPE
from ..modeling.derived_layout import derived_architecture_of
from ..modeling.modeling_otter import OtterForCausalLMMixin
from ..modeling.persistence import OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME, reading_checkpoint
from .model_cards import otter_model_card

OTTER_MODEL_TYPES = frozenset(
    model_class.config_class.model_type for model_class in OTTER_CLASSES_BY_BASE_MODEL_TYPE.values()
)
OTTER_ONLY_FILES = (OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME)
MODEL_CARD_NAME = "README.md"


def push_to_hub(
    model, repo_id: str, *, otter_only: bool = False, tokenizer=None, max_shard_size="50GB", **push_options
) -> CommitInfo:
    """Upload an Otter model to `repo_id` in one commit, with an Otter model card.

    Args:
        model: an Otter causal LM (e.g. from `otter_hf.insert` or `AutoModelForCausalLM.from_pretrained`).
        repo_id: the Hub repository, created if needed.
        otter_only: upload only the inserted parameters (`model.save_otter`), a repository that names its base
            model; `otter_hf.load_otter(None, repo_id)` loads it back onto that base.
        tokenizer: a tokenizer (or processor) to upload beside a full checkpoint.
        max_shard_size: passed to `save_pretrained`.
        **push_options: the options of `push_folder` (card content, commit message, privacy, token, ...).

    Returns:
        The `CommitInfo` of the commit (a string: its URL).
    """
    with tempfile.TemporaryDirectory(prefix="otter-push-") as folder:
        if otter_only:
            if tokenizer is not None:
                raise ValueError("An inserted-only repository has no tokenizer: it uses its base model's.")
            model.save_otter(folder)
        else:
            model.save_pretrained(folder, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        return push_folder(folder, repo_id, **push_options)


def push_folder(
    folder,
    repo_id: str,
    *,
    otter_only: bool | None = None,
    base_model: str | None = None,
    trained_on: str | None = None,
    datasets: Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    overhead: Mapping | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload a folder written by `save_pretrained` or `save_otter` to `repo_id` in one commit, with an Otter card.

    Args:
        folder: the saved folder. Its own README.md, if any, is replaced by the Otter card.
        repo_id: the Hub repository, created if needed.
        otter_only: None uploads the folder as saved; True uploads only the inserted parameters of a full
            checkpoint (the model is loaded and `save_otter` runs on it).
        base_model: Hub id of the base model, for the card, and written into an inserted-only repository so that
            loading it fetches that base. Defaults to the base the save names. Needed when that is a local path:
            an inserted-only repository must name a base that can be fetched from the Hub.
        trained_on, datasets, metrics, overhead, license, tags: card content, see
            `otter_hf.lifecycle.model_cards.otter_model_card`.
        commit_message, commit_description, private, token, revision, create_pr: as for `HfApi.create_commit`
            and `HfApi.create_repo`.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No folder at {folder}: save the model with `save_pretrained` or `save_otter` first.")
    with contextlib.ExitStack() as stack:
        # Read and uploaded under the folder's shared lock, so that no save replaces files midway.
        stack.enter_context(reading_checkpoint(folder))
        _refuse_symbolic_links(folder)
        saved_otter_only = _is_otter_only_save(folder)
        if otter_only is False and saved_otter_only:
            raise ValueError(
                f"{folder} holds only inserted parameters (`save_otter`); it cannot be uploaded as a full checkpoint."
            )
        if otter_only and not saved_otter_only:
            model = AutoModelForCausalLM.from_pretrained(folder)
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="otter-push-"))
            model.save_otter(folder)
            saved_otter_only = True

        config = _load_otter_config(folder, saved_otter_only)
        base_model = _hub_base_model(base_model, config.base_model_name_or_path, require=saved_otter_only)
        num_inserted_parameters, num_base_parameters = _parameter_counts(config)
        has_tokenizer = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
        card = otter_model_card(
            config,
            repo_id=repo_id,
            otter_only=saved_otter_only,
            num_inserted_parameters=num_inserted_parameters,
            num_base_parameters=num_base_parameters,
            base_model=base_model,
            tokenizer_repo=repo_id if has_tokenizer else base_model,
            trained_on=trained_on,
            datasets=datasets,
            metrics=metrics,
            overhead=overhead,
            license=license,
            tags=tags,
        )

        operations = [CommitOperationAdd(MODEL_CARD_NAME, str(card).encode())]
        if saved_otter_only:
            saved_config = _read_json(os.path.join(folder, OTTER_CONFIG_NAME))
            # The uploaded save names the Hub base, so that loading it elsewhere fetches that base.
            saved_config["base_model_name_or_path"] = base_model
            operations.append(
                CommitOperationAdd(OTTER_CONFIG_NAME, json.dumps(saved_config, indent=2, sort_keys=True).encode())
            )
            operations.append(CommitOperationAdd(OTTER_WEIGHTS_NAME, os.path.join(folder, OTTER_WEIGHTS_NAME)))
        else:
            operations.extend(
                CommitOperationAdd(path_in_repo, os.path.join(folder, path_in_repo))
                for path_in_repo in _checkpoint_files(folder)
            )

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        default_message = "Upload Otter inserted parameters" if saved_otter_only else "Upload Otter model"
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or default_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def otter_files(
    path_or_repo_id, *, token: str | bool | None = None, cache_dir=None, local_files_only: bool = False
) -> str:
    """The local folder holding an inserted-only save: `path_or_repo_id` itself when it is a folder, else the
    snapshot of the Hub repository's `otter_config.json` and `otter_model.safetensors`."""
    if os.path.isdir(path_or_repo_id):
        return os.fspath(path_or_repo_id)
    try:
        validate_repo_id(os.fspath(path_or_repo_id))
    except HFValidationError:
        raise ValueError(f"{path_or_repo_id} is neither a folder nor a Hub repository id.") from None
    return snapshot_download(
        os.fspath(path_or_repo_id),
        allow_patterns=list(OTTER_ONLY_FILES),
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )


def _is_otter_only_save(folder: str) -> bool:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return False
    if all(os.path.isfile(os.path.join(folder, name)) for name in OTTER_ONLY_FILES):
        return True
    raise ValueError(
        f"{folder} is not a saved Otter model: expected config.json (`save_pretrained`) or {OTTER_CONFIG_NAME} and "
        f"{OTTER_WEIGHTS_NAME} (`save_otter`)."
    )


def _load_otter_config(folder: str, otter_only: bool):
    saved = _read_json(os.path.join(folder, OTTER_CONFIG_NAME if otter_only else "config.json"))
    model_type = saved.get("model_type")
    if model_type not in OTTER_MODEL_TYPES and not (
        isinstance(model_type, str) and derived_architecture_of(model_type)
    ):
        raise ValueError(
            f"{folder} holds a {saved.get('model_type')!r} model, not an Otter model; insert Otter parameters first "
            "(`otter_hf.insert` or `otter-hf insert`)."
        )
    if otter_only:
        return CONFIG_MAPPING[saved["model_type"]].from_dict(saved)
    return AutoConfig.from_pretrained(folder)


def _hub_base_model(base_model: str | None, saved_base: str | None, require: bool) -> str | None:
    """The base model's Hub id: the one given, else the one the save names unless that is a local path."""
    if base_model is None and saved_base and not os.path.exists(saved_base):
        base_model = saved_base
    if base_model is not None:
        try:
            validate_repo_id(base_model)
        except HFValidationError:
            raise ValueError(
                f"The base model must be a Hub repository id such as 'org/model', got {base_model!r}."
            ) from None
    elif require:
        raise ValueError(
            f"These inserted parameters were made for {saved_base or 'a base model that is not named'}, which is not "
            "on the Hub; pass the Hub id of the same checkpoint as `base_model` (`--base-model` on the command line), "
            "so that loading the repository can fetch it."
        )
    return base_model


def _parameter_counts(config) -> tuple[int, int]:
    """(inserted, original) parameter counts, from a weightless model built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.num_inserted_parameters(), model.num_base_parameters()


def _refuse_symbolic_links(folder: str) -> None:
    """A checkpoint folder is untrusted: a link in it could upload a file from anywhere (a key beside `~/.ssh`)."""
    for root, directories, names in os.walk(folder):
        for name in directories + names:
            path = os.path.join(root, name)
            if os.path.islink(path):
                raise ValueError(
                    f"Refusing to upload {folder}: {os.path.relpath(path, folder)} is a symbolic link, and an upload "
                    "sends only the files a checkpoint folder holds itself. Replace links by the files they name "
                    "(`cp -rL folder copy`) if those files belong in the repository."
                )


def _checkpoint_files(folder: str) -> list[str]:
    """Files of a saved checkpoint, relative to `folder`; hidden files and any old model card are left out."""
    files = []
    for root, directories, names in os.walk(folder):
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        for name in sorted(names):
            path_in_repo = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not name.startswith(".") and path_in_repo != MODEL_CARD_NAME:
                files.append(path_in_repo)
    return files


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


# `model.push_to_hub(...)` of an Otter model uploads through here, with its model card, where otter_hf is installed.
OtterForCausalLMMixin.push_with_model_card = push_to_hub

__all__ = ["otter_files", "push_folder", "push_to_hub"]
