"""The README: its quick start runs as pasted, and its table of architectures is the registry's."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from otter_hf.modeling import OTTER_ARCHITECTURES

REPOSITORY = Path(__file__).resolve().parent.parent
README = (REPOSITORY / "README.md").read_text()


def architecture_table() -> str:
    """The README's table of supported architectures, written from `OTTER_ARCHITECTURES`."""
    rows = [
        "| base `model_type` | base class (transformers) | Otter causal LM | Otter `model_type` |",
        "|---|---|---|---|",
    ]
    for causal_lm, _ in OTTER_ARCHITECTURES:
        config_class = causal_lm.config_class
        # An Otter causal LM subclasses the Otter mixin and the architecture's own causal LM.
        base_class = causal_lm.__bases__[1]
        rows.append(
            f"| `{config_class.base_model_type}` | `{base_class.__name__}` | `{causal_lm.__name__}` | "
            f"`{config_class.model_type}` |"
        )
    return "\n".join(rows)


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.DOTALL | re.MULTILINE)
    assert match, f"README.md has no section {title!r}"
    return match.group(1)


def test_the_architecture_table_lists_every_registered_architecture():
    table = architecture_table()
    assert table in README, f"README.md's architecture table is out of date; it should read:\n{table}"


def test_the_readme_holds_two_set_up_commands():
    commands = re.findall(r"^```bash\n(.*?)```", section("Set up and run"), re.DOTALL | re.MULTILINE)
    assert len(commands) == 2
    assert commands[0].strip().endswith("python -m otter_hf.demo") and commands[1].strip().endswith("python -m pytest")


def _embedded_model_installed() -> bool:
    from otter_hf import embedded_model

    try:
        embedded_model.embedded_base_model_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
def test_the_quick_start_runs_as_pasted(tmp_path):
    if not _embedded_model_installed():
        pytest.skip("the quick start needs the embedded base model: run the README's first set-up command")
    (code,) = re.findall(r"^```python\n(.*?)```", section("Quick start"), re.DOTALL | re.MULTILINE)
    # In a folder of its own, with this checkout's otter_hf, offline: what a reader gets from a fresh clone.
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "OtterLlamaForCausalLMWithValueHead" in completed.stdout
    assert (tmp_path / "otter-smollm2" / "config.json").is_file()
