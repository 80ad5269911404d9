"""Writing a command's output as a unit: a whole folder (through `persistence.replace_files`) or one file, so an
interrupted command leaves the previous output, never half of the new one."""

import contextlib
import os

from ..modeling.persistence import replace_files


@contextlib.contextmanager
def replacing_folder(path: str):
    """Yield an empty folder to write a command's output into; it then replaces everything in `path` as a unit."""
    with replace_files(path, stale=lambda name: True) as staging:
        yield staging


@contextlib.contextmanager
def replacing_file(path: str):
    """Yield a file open for writing whose contents replace `path` once written in full."""
    temporary = f"{path}.partial"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            yield file
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
