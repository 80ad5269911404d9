"""The fixtures the tests share; the helpers they are built on are in tests/helpers.py."""

import pytest
from huggingface_hub import constants

from tests.helpers import BASE_MODELS, FakeHub, make_base, make_tokenizer, make_word_id_tokenizer


@pytest.fixture(params=sorted(BASE_MODELS))
def base_name(request):
    return request.param


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def base_folder(tmp_path):
    """A saved tiny Llama base with a tokenizer, as the command line reads one."""
    folder = tmp_path / "base"
    make_base("llama-gqa-tied").save_pretrained(folder)
    make_word_id_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(str(tmp_path / "hub"))
    # Offline: any request that reaches the network fails, so everything below runs against the folder.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub.cache_dir)
    monkeypatch.setattr("otter_hf.lifecycle.hub.HfApi", hub)
    return hub
