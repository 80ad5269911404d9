"""transformers' own common model tests (`ModelTesterMixin`), from the sdist of the installed release.

The tests ship in transformers' source distribution, not in its wheel. `model_tester_mixin()` downloads the sdist
of the installed version through pip into a cache folder once (`OTTER_TRANSFORMERS_TESTS_CACHE`, else
`~/.cache/otter_hf`), extracts `tests/test_modeling_common.py` from it and imports it. Where that cannot be done
(no registry), the tests that need it skip with the command that fetches it; with `OTTER_REQUIRE_TRANSFORMERS_TESTS=1`
(set by CI) they fail instead.

The sdist carries the top-level test modules only; `test_modeling_common.py` imports two siblings it lacks, whose
mixins it merely inherits or names: `ExportTesterMixin` (the `torch.export` tests, which live in
`tests/exporters/`) and `GenerationTesterMixin` (the `generate()` tests, in `tests/generation/`). They stand in as
empty classes, so those two groups of tests are not run here. `parameterized`, a test dependency of transformers,
stands in likewise where it is not installed, with the expansion the mixin uses.
"""

import contextlib
import functools
import importlib
import inspect
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest
import transformers
from transformers.models.auto import modeling_auto

PACKAGE = "otter_transformers_tests"
REQUIRE_VARIABLE = "OTTER_REQUIRE_TRANSFORMERS_TESTS"
# The members of the sdist this needs, and the empty stand-ins for the siblings it lacks.
SDIST_MEMBER = "tests/test_modeling_common.py"
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def cache_folder() -> Path:
    root = os.environ.get("OTTER_TRANSFORMERS_TESTS_CACHE") or Path.home() / ".cache" / "otter_hf"
    return Path(root) / f"transformers-{transformers.__version__}-tests"


def fetch_command(folder: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"transformers=={transformers.__version__}",
        "-d",
        str(folder),
    ]


def _unavailable(reason: str):
    command = " ".join(fetch_command(cache_folder() / "sdist"))
    message = f"transformers' common model tests are unavailable: {reason}. Fetch them with `{command}`."
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(f"{message} ({REQUIRE_VARIABLE}=1 makes this a failure.)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def _extract(folder: Path) -> None:
    """Write the test package to `folder` (whole or not at all): the sdist's module and the stand-ins."""
    # The sdists of every version fetched share this folder: take the installed version's.
    sdist_folder = folder.parent / "sdist"
    archives = sorted(sdist_folder.glob(f"transformers-{transformers.__version__}.tar.gz"))
    if not archives:
        sdist_folder.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run(fetch_command(sdist_folder), capture_output=True, text=True)
        archives = sorted(sdist_folder.glob(f"transformers-{transformers.__version__}.tar.gz"))
        if fetched.returncode != 0 or not archives:
            _unavailable(f"pip could not download the sdist ({fetched.stderr.strip().splitlines()[-1:]})")
    staging = Path(tempfile.mkdtemp(dir=folder.parent))
    try:
        package = staging / PACKAGE
        package.mkdir()
        with tarfile.open(archives[-1]) as archive:
            member = archive.getmember(f"{archives[-1].name.removesuffix('.tar.gz')}/{SDIST_MEMBER}")
            (package / "test_modeling_common.py").write_bytes(archive.extractfile(member).read())
        (package / "__init__.py").write_text("")
        for path, text in STAND_INS.items():
            (package / path).parent.mkdir(exist_ok=True)
            (package / path).parent.joinpath("__init__.py").write_text("")
            (package / path).write_text(text)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _expand(cases):
    """`parameterized.expand`: one test method per case, `<name>_<index>_<first argument>`, in the class body."""
    class_body = inspect.currentframe().f_back.f_locals

    def expand(test):
        for index, case in enumerate(cases):
            arguments = case if isinstance(case, tuple) else (case,)
            suffix = "".join(c if c.isalnum() else "_" for c in str(arguments[0]))
            class_body[f"{test.__name__}_{index}_{suffix}"] = _bound_case(test, arguments)

    return expand


def _bound_case(test, arguments: tuple):
    def run_case(self):
        return test(self, *arguments)

    return run_case


def _install_parameterized_stand_in() -> None:
    try:
        importlib.import_module("parameterized")
    except ImportError:
        module = types.ModuleType("parameterized")
        module.parameterized = types.SimpleNamespace(expand=_expand)
        sys.modules["parameterized"] = module


@functools.cache
def _test_modeling_common():
    folder = cache_folder()
    if not (folder / PACKAGE / "test_modeling_common.py").exists():
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        _extract(folder)
    _install_parameterized_stand_in()
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(f"{PACKAGE}.test_modeling_common")
    finally:
        sys.path.remove(str(folder))


def load_test_modeling_common():
    """transformers' `tests/test_modeling_common.py` of the installed version, imported; skips (or fails, in CI)
    where it cannot be had."""
    try:
        return _test_modeling_common()
    except (OSError, KeyError, tarfile.TarError) as error:
        _unavailable(f"{type(error).__name__}: {error}")


@contextlib.contextmanager
def registered_names(model_type: str, model: type, causal_lm: type, sequence_classification: type):
    """The Otter classes in the name tables the mixin reads to know what a class is (as an in-tree model's are)."""
    tables = (
        (modeling_auto.MODEL_MAPPING_NAMES, model),
        (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, causal_lm),
        (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, sequence_classification),
    )
    for table, model_class in tables:
        table[model_type] = model_class.__name__
    try:
        yield
    finally:
        for table, _ in tables:
            del table[model_type]
