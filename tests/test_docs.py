"""Every Python block of README.md and docs/*.md runs in a test, or its page says why not (tests/doc_blocks.py)."""

import re
import socket
import sys

import pytest

from tests.doc_blocks import PAGES, TEST_MARKS, all_code_blocks, markers_without_a_block, run_script, scripts

SLOW_SCRIPTS = scripts("slow")
MULTIPROCESS_BLOCKS = [block for block in all_code_blocks() if block.test_mark == "multiprocess"]
# What a page's slow blocks leave behind, beyond running without error.
SLOW_RESULTS = {"README.md": ("otter-smollm2/config.json", "OtterLlamaForCausalLMWithValueHead")}


def test_every_python_block_runs_in_a_test_or_says_why_not():
    undeclared = [
        f"{block.where} ({block.marker or 'no marker'})"
        for block in all_code_blocks()
        if block.test_mark not in TEST_MARKS and not block.not_run_reason
    ]
    assert not undeclared, (
        "Python blocks neither run nor declared; put `<!-- test: slow -->` (or multiprocess, vllm) or "
        f"`<!-- not-run: why -->` on the line before each (tests/doc_blocks.py): {undeclared}"
    )


def test_every_marker_stands_right_before_a_python_block():
    stray = [where for page in PAGES for where in markers_without_a_block(page)]
    assert not stray, f"markers that declare no Python block: {stray}"


def test_the_docs_pages_are_linked_from_the_readme():
    readme = PAGES[0].read_text()
    unlinked = [page.name for page in PAGES[1:] if f"(docs/{page.name})" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def _embedded_model_installed() -> bool:
    from otter_hf import embedded_model

    try:
        embedded_model.embedded_base_model_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(SLOW_SCRIPTS))
def test_the_slow_blocks_of_a_page_run_as_pasted(page, tmp_path):
    if not _embedded_model_installed():
        pytest.skip("the blocks need the embedded base model: run the README's first set-up command")
    completed = run_script(SLOW_SCRIPTS[page], tmp_path)
    if page in SLOW_RESULTS:
        written, printed = SLOW_RESULTS[page]
        assert (tmp_path / written).is_file()
        assert printed in completed.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


TINY_BASE = """
import sys
sys.path.insert(0, {repository!r})
from tests.helpers import make_base, make_tokenizer
make_base("llama-gqa-tied").save_pretrained("tiny-base")
make_tokenizer().save_pretrained("tiny-base")
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("block", MULTIPROCESS_BLOCKS, ids=lambda block: block.where)
def test_a_training_script_trains_on_two_processes(block, tmp_path):
    run_script(TINY_BASE.format(repository=str(PAGES[0].parent)), tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher = [*torchrun, "--master_port", str(_free_port())]
    completed = run_script(block.code, tmp_path, "tiny-base", "trained", launcher=launcher)
    assert (tmp_path / "trained" / "model.safetensors").is_file(), completed.stdout[-3000:]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_links_between_pages_lead_somewhere():
    broken = []
    for page in [*PAGES, PAGES[0].parent / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.MULTILINE)
                if anchor not in {_anchor(heading) for heading in headings}:
                    broken.append(f"{page.name}: {target}")
    assert not broken, f"links to no file or no heading: {broken}"
