"""The README: its two set-up commands, and its table of architectures is the registry's (its code blocks run in
tests/test_docs.py)."""

import json
import re
from pathlib import Path

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


def test_the_readme_says_how_many_more_types_the_derived_layout_covers():
    reach = json.loads((REPOSITORY / "benchmarks" / "results" / "architecture_reach.json").read_text())
    assert f"layout is exact on {reach['exact_derived']} more types" in " ".join(README.split())


def test_the_readme_holds_two_set_up_commands():
    commands = re.findall(r"^```bash\n(.*?)```", section("Set up and run"), re.DOTALL | re.MULTILINE)
    assert len(commands) == 2
    assert commands[0].strip().endswith("python -m otter_hf.demo") and commands[1].strip().endswith("python -m pytest")
