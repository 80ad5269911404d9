"""Writing Otter checkpoints so that the files of one save replace the previous ones as a unit.

`save_pretrained` and `save_otter` keep transformers' convention: they replace the files they write, remove
their own stale weight files, and leave every other file in the folder (a tokenizer saved beside the model)
alone. Here the files of one save also change together. A save writes into a scratch folder inside the target
folder, `.otter-save-*`, holding `new/` (the files being saved), `previous/` (the files they replace) and a
journal, then commits:

1. the journal is written, listing the entries to move in; before it exists nothing outside the scratch folder
   has changed;
2. the entries the save replaces or removes are moved aside into `previous/`, except the last entry to move in;
3. the new entries are moved in, the completion marker (`config.json` or `otter_config.json`) last, atomically
   replacing the previous one: moving in the last entry is the commit point;
4. the journal is deleted, then the scratch folder.

A failure or interrupt before the commit point moves the previous files back. A process killed mid-save leaves
its scratch folder behind; the next save into that folder, or the next load from it, settles it: it rolls back a
save that had not reached its commit point, and only deletes the scratch of one that had.

Readers and writers take a lock on the checkpoint folder itself (`flock` on the folder's descriptor, so nothing
is added to the folder and read-only folders lock too): steps 1-4 run under the exclusive lock, and a load reads
under the shared lock (`reading_checkpoint`), so it sees the previous save or the new one, never a mix, and
concurrent saves commit one after the other. Writing the new files into the scratch folder takes no folder lock,
so loads are only held back while files are renamed. On Windows, without `fcntl`, there is no locking.

Settling stays inside the folder, as a downloaded or cloned checkpoint may carry a crafted scratch folder: it
refuses a scratch folder, or any entry of one, that is a symbolic link, and a journal naming anything but plain
file names; a load that finds such a scratch folder refuses to load and says what to do. A load also refuses a
folder whose entries are links leading out of it (a Hub cache snapshot's links into its `blobs` are followed).

Like the modeling files, this file imports only torch, transformers, safetensors, the standard library and its
sibling `quantization.py`, as it ships next to checkpoints for `trust_remote_code`.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

from .quantization import dequantized, is_quantized_tensor

try:
    import fcntl
except ImportError:  # Windows: no locks; a scratch folder's owner cannot be told apart, every one counts as abandoned
    fcntl = None

logger = logging.get_logger(__name__)

OTTER_CONFIG_NAME = "otter_config.json"
OTTER_WEIGHTS_NAME = "otter_model.safetensors"
# What loaders read first to tell what a folder holds: moved in last, the commit point of a save.
COMPLETION_MARKERS = ("config.json", OTTER_CONFIG_NAME)

SCRATCH_PREFIX = ".otter-save-"
_NEW, _PREVIOUS, _JOURNAL, _LOCK = "new", "previous", "journal.json", "lock"


def base_weights_fingerprint(named_parameters: Iterable[tuple[str, torch.Tensor]], model: nn.Module) -> str:
    """Digest of the original parameters of `model` (pass only those, by their names in `model`), cheap even for
    large models.

    It hashes every name and shape plus an evenly strided sample of each tensor rounded to bfloat16, so the
    same checkpoint loaded in fp32, fp16 or bf16 gives the same fingerprint while other weights do not. A quantized
    tensor counts with its dequantized values: the same checkpoint quantized the same way gives the same
    fingerprint, its unquantized weights another.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(named_parameters, key=lambda item: item[0]):
        if is_quantized_tensor(tensor):
            tensor = dequantized(tensor, model.get_submodule(name.rpartition(".")[0]))
        tensor = tensor.detach()
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def weight_files_of(variant: str | None = None) -> Callable[[str], bool]:
    """Whether a file name is one `save_pretrained` writes weights to (single file, shard or index) for `variant`.

    A save removes those it does not write again: a leftover single file would be loaded instead of new shards,
    and leftover shards or index would sit beside a new single file.
    """
    infix = re.escape(f".{variant}") if variant else ""
    pattern = re.compile(rf"model{infix}(-\d{{5}}-of-\d{{5}})?\.safetensors|model\.safetensors\.index{infix}\.json")
    return lambda name: pattern.fullmatch(name) is not None


@contextlib.contextmanager
def replace_files(save_directory, *, stale: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yield an empty folder to write a save into; when the block ends without error, its entries replace the
    entries of the same names in `save_directory`, and the entries for which `stale(name)` is true go, as one unit.

    On an error or interrupt `save_directory` is left as it was (and removed again if this created it). A save
    that writes nothing changes nothing. See the module docstring for how a killed save is settled later.
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    created = not os.path.isdir(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    # Created with its locked lock file under the folder's lock, which settling takes too, so that a scratch folder
    # without a lock file is always one of a killed save. Opened through open(), the lock file also shows the
    # permissions a new file gets here (see below).
    with folder_lock(save_directory, exclusive=True):
        scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=save_directory)
        lock = open(os.path.join(scratch, _LOCK), "w")  # noqa: SIM115  held until the save ends, past this block
        _lock(lock)
    with lock:
        try:
            staging = os.path.join(scratch, _NEW)
            os.mkdir(staging)
            os.mkdir(os.path.join(scratch, _PREVIOUS))
            yield staging
            # safetensors creates its files owner-only (0600); give every file the mode any new file gets.
            _set_file_modes(staging, stat.S_IMODE(os.fstat(lock.fileno()).st_mode))
            with folder_lock(save_directory, exclusive=True):
                recover_interrupted_saves(save_directory)  # our own scratch is locked, so left alone
                try:
                    _commit(save_directory, scratch, stale or (lambda name: False))
                finally:
                    _settle(save_directory, scratch)
        except BaseException:
            if os.path.isdir(scratch):
                with folder_lock(save_directory, exclusive=True):
                    _settle(save_directory, scratch)
            if created and not os.listdir(save_directory):
                os.rmdir(save_directory)
            raise


@contextlib.contextmanager
def folder_lock(directory, *, exclusive: bool) -> Iterator[None]:
    """Hold the shared (readers) or exclusive (a save's commit, settling) lock of a checkpoint folder.

    The lock is an `flock` on the folder's own descriptor: it needs no file in the folder, no write permission,
    and goes with the process that holds it, however that ends.
    """
    if fcntl is None:
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(descriptor)  # releases the lock


@contextlib.contextmanager
def reading_checkpoint(path, subfolder: str | None = None) -> Iterator[None]:
    """Settle what interrupted saves left in the local folder `path`, then hold its shared lock while the block
    reads it, so that the block reads one whole save. A Hub id (not a local folder) is read as it is.

    Raises a ValueError when the folder holds an interrupted save that cannot be settled safely (see the module
    docstring); the folder would then hold a mix of two saves, or files that did not come from a save. Raises one
    too when an entry of the folder is a symbolic link leading out of it (`_refuse_links_out_of`).
    """
    if path is None:
        yield  # a model built from its config alone
        return
    folder = os.fspath(path)
    path = os.path.join(folder, subfolder) if subfolder else folder
    if not os.path.isdir(path):
        yield  # a Hub id: its snapshots are written by huggingface_hub
        return
    _refuse_links_out_of(folder, path)
    if fcntl is None:
        _settle_before_loading(path)
        yield
        return
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        visited = set()  # scratch folders settled, or left to a save still running
        while True:
            fcntl.flock(descriptor, fcntl.LOCK_SH)
            scratch_folders = _scratch_folders(path)
            # Under the shared lock no save is committing, so a journal is one a killed save left mid-commit.
            left_mid_commit = [
                scratch for scratch in scratch_folders if os.path.lexists(os.path.join(scratch, _JOURNAL))
            ]
            if any(scratch in visited for scratch in left_mid_commit):
                raise ValueError(
                    f"{path} holds an interrupted save ({os.path.basename(left_mid_commit[0])}) that could not be "
                    "settled; load it again, or restore the folder from a copy."
                )
            if not left_mid_commit and visited.issuperset(scratch_folders):
                break
            visited.update(scratch_folders)
            try:
                # Not atomic: a save may commit in between, which the next round sees. Without a journal the
                # scratch folders changed nothing in the folder, so they are left for later while others read.
                fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if left_mid_commit else fcntl.LOCK_NB))
            except BlockingIOError:
                continue
            _settle_before_loading(path)
        yield
    finally:
        os.close(descriptor)


def recover_before_loading(path, subfolder: str | None = None) -> None:
    """Settle what interrupted saves left in the folder `path` (see `reading_checkpoint`), before reading it."""
    with reading_checkpoint(path, subfolder):
        pass


def recover_interrupted_saves(directory) -> None:
    """Settle what killed saves left in `directory`: roll back an uncommitted save, finish a committed one.

    A save still running in another process holds its scratch folder's lock and is left alone. A scratch folder
    that a save could not have left (see `UnsafeScratchFolderError`) is refused and left as it is.
    """
    directory = os.fspath(directory)
    for scratch in _scratch_folders(directory):
        _check_scratch_folder(directory, scratch)
        try:
            lock = open(os.path.join(scratch, _LOCK), "r+")  # noqa: SIM115  held while the scratch folder is settled
        except FileNotFoundError:
            # Killed right after creating its scratch folder (or just about to lock it: deleting the folder then
            # fails that save before it changed anything).
            shutil.rmtree(scratch)
            continue
        with lock:
            try:
                _lock(lock, blocking=False)
            except BlockingIOError:
                continue
            logger.warning(f"Settling a save into {directory} that was interrupted ({os.path.basename(scratch)}).")
            _settle(directory, scratch)


class UnsafeScratchFolderError(ValueError):
    """A `.otter-save-*` folder that no save of otter_hf could have left: settling it could reach outside the
    checkpoint folder, so it is refused."""

    def __init__(self, directory: str, scratch: str, reason: str):
        super().__init__(
            f"{directory} holds {os.path.basename(scratch)}, which looks like the scratch folder of an interrupted "
            f"save but {reason}; otter_hf will not follow it, as that could move files outside the checkpoint. The "
            "checkpoint may have been tampered with: check where it comes from, then delete that folder "
            f"(`rm -r {scratch}`) to load the files beside it, or download the checkpoint again."
        )


def _refuse_links_out_of(folder: str, path: str) -> None:
    """Refuse a local checkpoint whose entries (or `subfolder`) are symbolic links leading out of it: a crafted
    folder could otherwise have any file of this machine read as its weights, config or tokenizer, and a later
    save or push carry it on. Links within the folder are followed, and so are a Hub cache snapshot's links into
    the cache's `blobs` folder."""
    root = os.path.realpath(folder)
    allowed = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    entries = [path] if path != folder else []
    # Scratch folders get their own checks and message (`_check_scratch_folder`).
    entries += [os.path.join(path, name) for name in sorted(os.listdir(path)) if not name.startswith(SCRATCH_PREFIX)]
    for entry in entries:
        target = os.path.realpath(entry)
        if not any(os.path.commonpath([target, inside]) == inside for inside in allowed):
            raise ValueError(
                f"{entry} leads out of the checkpoint folder {folder}, to {target}: otter_hf does not follow a "
                "checkpoint's links out of it, as a crafted folder could have any file of this machine read. If you "
                "trust that file, copy it into the folder in place of the link (`cp --remove-destination`)."
            )


def _scratch_folders(directory: str) -> list[str]:
    return [os.path.join(directory, name) for name in sorted(os.listdir(directory)) if name.startswith(SCRATCH_PREFIX)]


def _check_scratch_folder(directory: str, scratch: str) -> None:
    """Refuse a scratch folder that is a link or holds links, or whose journal names anything but plain names."""
    if os.path.islink(scratch) or not os.path.isdir(scratch):
        raise UnsafeScratchFolderError(directory, scratch, "it is a symbolic link or not a folder")
    for part in (_NEW, _PREVIOUS, _JOURNAL, _LOCK):
        if os.path.islink(os.path.join(scratch, part)):
            raise UnsafeScratchFolderError(directory, scratch, f"its `{part}` is a symbolic link")
    for part in (_NEW, _PREVIOUS):
        folder = os.path.join(scratch, part)
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise UnsafeScratchFolderError(directory, scratch, f"its `{part}` is not a folder")
        links = [
            name
            for name in (os.listdir(folder) if os.path.isdir(folder) else ())
            if os.path.islink(os.path.join(folder, name))
        ]
        if links:
            raise UnsafeScratchFolderError(directory, scratch, f"`{part}/{links[0]}` is a symbolic link")
    if os.path.lexists(os.path.join(scratch, _JOURNAL)):
        _read_journal(directory, scratch)


def _read_journal(directory: str, scratch: str) -> list[str]:
    """The entries a save was moving in, each a plain name in the folder (refused otherwise)."""
    try:
        with open(os.path.join(scratch, _JOURNAL), encoding="utf-8") as file:
            entries = json.load(file)["move_in"]
    except (ValueError, KeyError, TypeError):
        raise UnsafeScratchFolderError(directory, scratch, "its journal is not one a save writes") from None
    if not isinstance(entries, list) or not entries:
        raise UnsafeScratchFolderError(directory, scratch, "its journal lists no entries")
    for name in entries:
        if not _is_plain_name(name):
            raise UnsafeScratchFolderError(
                directory, scratch, f"its journal names {name!r}, which is not a plain file name"
            )
    return entries


def _is_plain_name(name) -> bool:
    """Whether `name` names an entry of the folder itself: no separator, no `..`, not absolute, not our scratch."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        # Both separators whatever the system, so that a checkpoint made elsewhere is judged the same.
        and not any(character in name for character in ("/", "\\", "\0"))
        and not name.startswith(SCRATCH_PREFIX)
    )


def _settle_before_loading(path: str) -> None:
    try:
        recover_interrupted_saves(path)
    except UnsafeScratchFolderError:
        raise
    except OSError as error:
        if any(os.path.lexists(os.path.join(scratch, _JOURNAL)) for scratch in _scratch_folders(path)):
            raise ValueError(
                f"{path} holds a save that was interrupted mid-way, and it cannot be settled ({error}): the folder "
                "would load as a mix of two saves. Make the folder writable and load it again, or restore it from a "
                "copy."
            ) from error
        # Only scratch folders of saves that changed nothing yet: the folder loads as its last whole save.
        logger.warning(f"Could not remove the scratch of an interrupted save in {path} ({error}).")


def save_remote_code(model, save_directory) -> None:
    """Copy the files defining `model`'s Auto classes beside its checkpoint and map them in `config.auto_map`.

    transformers ships and maps only the class being saved (and its config); the backbone and the other heads
    are defined in sibling files, which are copied flat beside them, as transformers does.
    """
    if not model.auto_map_classes:
        return
    os.makedirs(save_directory, exist_ok=True)
    auto_map = dict(getattr(model.config, "auto_map", None) or {})
    for auto_class, model_class in model.auto_map_classes.items():
        source = sys.modules[model_class.__module__].__file__
        for path in (source, *get_relative_import_files(source)):
            shutil.copy(path, save_directory)
        auto_map[auto_class] = f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}"
    model.config.auto_map = auto_map


def save_inserted_parameters(save_directory, named_parameters: Iterable[tuple[str, torch.Tensor]], config) -> None:
    """Write inserted parameters (safetensors) and their config as one unit: what `save_otter` saves."""
    tensors = {name: parameter.detach().contiguous().cpu() for name, parameter in named_parameters}
    with replace_files(save_directory) as staging:
        save_file(tensors, os.path.join(staging, OTTER_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(staging, OTTER_CONFIG_NAME), "w", encoding="utf-8") as file:
            json.dump(config.to_dict(), file, indent=2, sort_keys=True)


# -- the commit and its recovery ---------------------------------------------------------------------------


def _lock(lock_file, blocking: bool = True) -> None:
    if fcntl is not None:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))


def _set_file_modes(folder: str, mode: int) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), mode)


def _commit(directory: str, scratch: str, stale: Callable[[str], bool]) -> None:
    staging, previous = os.path.join(scratch, _NEW), os.path.join(scratch, _PREVIOUS)
    entries = sorted(os.listdir(staging), key=lambda name: (name in COMPLETION_MARKERS, name))
    if not entries:
        return
    last = entries[-1]
    existing = sorted(name for name in os.listdir(directory) if not name.startswith(SCRATCH_PREFIX))
    set_aside = [name for name in existing if (name in entries or stale(name)) and name != last]
    journal_path = os.path.join(scratch, _JOURNAL)
    with open(journal_path + ".tmp", "w", encoding="utf-8") as file:
        json.dump({"move_in": entries}, file)
    os.replace(journal_path + ".tmp", journal_path)
    for name in set_aside:
        os.replace(os.path.join(directory, name), os.path.join(previous, name))
    for name in entries:
        os.replace(os.path.join(staging, name), os.path.join(directory, name))


def _settle(directory: str, scratch: str) -> None:
    """Roll back the save `scratch` belongs to if it had not reached its commit point, then delete `scratch`."""
    journal_path = os.path.join(scratch, _JOURNAL)
    if os.path.isfile(journal_path):
        entries = _read_journal(directory, scratch)
        staging = os.path.join(scratch, _NEW)
        if os.path.lexists(os.path.join(staging, entries[-1])):
            _roll_back(directory, scratch, entries)
        # Deleted first, so that a cleanup interrupted below is seen as settled and only deleted on a next visit.
        os.remove(journal_path)
    shutil.rmtree(scratch)


def _roll_back(directory: str, scratch: str, entries: list[str]) -> None:
    # Each step leaves the scratch folder describing what is left to do, so an interrupted roll-back resumes.
    staging, previous = os.path.join(scratch, _NEW), os.path.join(scratch, _PREVIOUS)
    for name in reversed(entries):
        moved_in = not os.path.lexists(os.path.join(staging, name))
        if moved_in and os.path.lexists(os.path.join(directory, name)):
            os.replace(os.path.join(directory, name), os.path.join(staging, name))
    for name in os.listdir(previous):
        os.replace(os.path.join(previous, name), os.path.join(directory, name))
