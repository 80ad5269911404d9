"""The Python code blocks of README.md and docs/*.md, and how each one is tested.

Every ```python block follows a marker line that says how it runs:

    <!-- test: slow -->          a page's `slow` blocks run in order, as one script, in an empty folder (they may
                                 continue each other), on the embedded base model (tests/test_docs.py, -m slow)
    <!-- test: multiprocess -->  the block is a script, run as `torchrun --nproc_per_node 2 SCRIPT BASE OUTPUT_DIR`
                                 on a tiny base model (tests/test_docs.py, -m multiprocess)
    <!-- test: vllm -->          as `slow`, in vLLM's environment, in a folder holding `otter-checkpoint`, a tiny
                                 Otter Llama with a token reward head (tests/test_vllm.py, -m vllm)
    <!-- not-run: REASON -->     never run; REASON says why (a Hub account, a GPU, ...)

tests/test_docs.py fails on a block without a marker. Standard library only: tests/test_vllm.py imports this in
vLLM's environment.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
PAGES = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
TEST_MARKS = ("slow", "multiprocess", "vllm")

_FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_MARKER = re.compile(r"<!-- (test|not-run): *(.*?) *-->")


@dataclass(frozen=True)
class CodeBlock:
    page: str  # relative to the repository
    line: int  # of the opening fence
    marker: str | None  # the line before the fence when it is a marker
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def test_mark(self) -> str | None:
        """The pytest mark of the run that executes this block, None when it is not run (or unmarked)."""
        match = _MARKER.fullmatch(self.marker or "")
        return match.group(2) if match and match.group(1) == "test" else None

    @property
    def not_run_reason(self) -> str | None:
        match = _MARKER.fullmatch(self.marker or "")
        return match.group(2) if match and match.group(1) == "not-run" else None


def code_blocks(page: Path) -> list[CodeBlock]:
    text = page.read_text()
    blocks = []
    for fence in _FENCE.finditer(text):
        line = text.count("\n", 0, fence.start()) + 1
        previous_lines = text[: fence.start()].rstrip("\n").rsplit("\n", 1)
        previous = previous_lines[-1].strip()
        blocks.append(
            CodeBlock(
                page=str(page.relative_to(REPOSITORY)),
                line=line,
                marker=previous if previous.startswith("<!--") else None,
                code=fence.group(1),
            )
        )
    return blocks


def all_code_blocks() -> list[CodeBlock]:
    return [block for page in PAGES for block in code_blocks(page)]


def markers_without_a_block(page: Path) -> list[str]:
    """Markers that are not on the line right before a ```python fence: they would declare nothing."""
    text = page.read_text()
    return [
        f"{page.relative_to(REPOSITORY)}:{text.count(chr(10), 0, match.start()) + 1}"
        for match in _MARKER.finditer(text)
        if not text[match.end() :].startswith("\n```python\n")
    ]


def scripts(test_mark: str) -> dict[str, str]:
    """For each page with blocks of `test_mark`: those blocks in order, as one script."""
    by_page: dict[str, list[str]] = {}
    for block in all_code_blocks():
        if block.test_mark == test_mark:
            by_page.setdefault(block.page, []).append(f"# {block.where}\n{block.code}")
    return {page: "\n".join(codes) for page, codes in by_page.items()}


def run_script(code: str, folder: Path, *arguments: str, launcher: list[str] | None = None, timeout: int = 900):
    """Run `code` as `script.py` in `folder` with this checkout's otter_hf, offline; fail with its stderr."""
    script = folder / "script.py"
    script.write_text(code)
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [*(launcher or [sys.executable]), str(script), *arguments],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    return completed
