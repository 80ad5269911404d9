"""Pushing Otter models to the Hub and pulling them back, against a fake Hub in a local folder, offline."""

import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModelForCausalLM

import otter_hf
from otter_hf.lifecycle.hub import push_folder, push_to_hub
from otter_hf.modeling.persistence import OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME
from tests.helpers import FakeHub, make_base, make_otter, random_batch


def put_base_on_hub(hub: FakeHub, base, repo_id: str, tmp_path) -> None:
    folder = tmp_path / repo_id.replace("/", "--")
    base.save_pretrained(folder)
    push_plain_folder(hub, folder, repo_id)


def push_plain_folder(hub: FakeHub, folder, repo_id: str) -> None:
    from huggingface_hub import CommitOperationAdd

    hub.create_repo(repo_id, exist_ok=True)
    operations = [CommitOperationAdd(name, str(folder / name)) for name in os.listdir(folder)]
    hub.create_commit(repo_id, operations, commit_message="Upload base model")


def _outputs(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask)


def test_push_to_hub_uploads_checkpoint_code_and_card_in_one_commit(fake_hub, tmp_path):
    put_base_on_hub(fake_hub, make_base("llama-gqa-tied"), "user/tiny-llama", tmp_path)
    otter = make_otter(AutoModelForCausalLM.from_pretrained("user/tiny-llama"))
    assert otter.config.base_model_name_or_path == "user/tiny-llama"
    commits_before = len(fake_hub.commits)

    commit = otter.push_to_hub(
        "user/otter-llama",
        trained_on="IMDB reviews labelled by sentiment",
        metrics={"eval_accuracy": 0.875, "eval_loss": 0.31},
        license="apache-2.0",
        tags=["sentiment"],
    )

    assert len(fake_hub.commits) == commits_before + 1
    assert commit.oid in commit.commit_url
    repo_id, message, files = fake_hub.commits[-1]
    assert repo_id == "user/otter-llama" and message == "Upload Otter model"
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "otter_llama.py",
        "modeling_otter.py",
        "persistence.py",
        "configuration_otter.py",
        "sequence_classification.py",
        "inserted_heads.py",
        "token_reward_guidance.py",
    } <= set(files)

    card = ModelCard(fake_hub.files("user/otter-llama")["README.md"].decode())
    assert card.data.base_model == "user/tiny-llama"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert {"otter", "value-head", "sentiment"} <= set(card.data.tags)
    assert f"{otter.num_inserted_parameters():,}" in card.text
    assert f"{otter.inserted_parameter_fraction():.2%}" in card.text
    assert "IMDB reviews labelled by sentiment" in card.text
    assert "| eval_accuracy | 0.875 |" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("user/otter-llama")' in card.text
    assert "model.generate(**inputs, reward_weight=1.5, reward_top_k=10" in card.text
    assert "token_reward_weight" not in card.text and "token-level-reward" not in card.data.tags
    assert "speculative_generate" not in card.text


def test_the_card_of_a_model_with_a_token_reward_head_says_how_to_decode_with_it(fake_hub, tmp_path):
    put_base_on_hub(fake_hub, make_base("qwen2-bias"), "user/tiny-qwen2", tmp_path)
    otter = make_otter(AutoModelForCausalLM.from_pretrained("user/tiny-qwen2"), token_reward_head=True)
    otter.push_to_hub("user/otter-genarm")
    card = ModelCard(fake_hub.files("user/otter-genarm")["README.md"].decode())
    assert "token-level-reward" in card.data.tags
    assert f"token-level reward head ({otter.config.vocab_size:,} x {otter.config.inserted_hidden_size}" in card.text
    assert "model.generate(**inputs, token_reward_weight=" in card.text
    assert f"{otter.num_inserted_parameters():,}" in card.text


def test_the_card_of_a_model_with_a_recurrent_draft_head_says_how_to_decode_with_it(fake_hub, tmp_path):
    put_base_on_hub(fake_hub, make_base("qwen2-bias"), "user/tiny-qwen2", tmp_path)
    otter = make_otter(
        AutoModelForCausalLM.from_pretrained("user/tiny-qwen2"), num_recurrent_drafts=4, draft_confidence_threshold=0.4
    )
    otter.push_to_hub("user/otter-drafts")
    card = ModelCard(fake_hub.files("user/otter-drafts")["README.md"].decode())
    assert f"a recurrent draft head drafting up to 4 tokens over {otter.config.vocab_size:,}" in card.text
    assert "custom_generate=speculative_generate" in card.text and "(0.4)" in card.text


def test_a_pushed_checkpoint_loads_through_the_auto_classes(fake_hub, base_name):
    otter = make_otter(make_base(base_name))
    input_ids, attention_mask = random_batch(2, 7, "left")
    expected = _outputs(otter, input_ids, attention_mask)
    push_to_hub(otter, "user/otter")

    assert isinstance(AutoConfig.from_pretrained("user/otter"), type(otter.config))
    loaded = AutoModelForCausalLM.from_pretrained("user/otter")
    assert type(loaded) is type(otter)
    saved, pulled = otter.state_dict(), loaded.state_dict()
    assert all(torch.equal(saved[name], pulled[name]) for name in saved)
    output = _outputs(loaded, input_ids, attention_mask)
    assert torch.equal(output.logits, expected.logits)
    real = attention_mask.bool()
    torch.testing.assert_close(output.value[real], expected.value[real], atol=1e-5, rtol=1e-5)


def test_our_card_replaces_the_one_in_the_folder(fake_hub, tmp_path):
    otter = make_otter(make_base("llama-mha-untied"))
    otter.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "README.md").write_text("---\nlibrary_name: transformers\n---\n# Model Card for Model ID\n")
    push_folder(tmp_path / "saved", "user/otter", base_model="org/base")
    card = ModelCard(fake_hub.files("user/otter")["README.md"].decode())
    assert "Model Card for Model ID" not in card.text
    assert "## Inserted parameters" in card.text and card.data.base_model == "org/base"


def test_the_card_reports_the_overhead_report(fake_hub):
    otter = make_otter(make_base("qwen2-bias"))
    overhead = {
        "base_model": "org/base",
        "dtype": "float32",
        "threads": 2,
        "prefill_512_tokens": {"base_seconds": 0.12, "otter_seconds": 0.15, "ratio": 1.25},
        "peak_memory": {"base_bytes": 1000, "otter_bytes": 1100, "ratio": 1.1},
    }
    push_to_hub(otter, "user/otter", overhead=overhead)
    text = ModelCard(fake_hub.files("user/otter")["README.md"].decode()).text
    assert "| prefill 512 tokens | 1.25x | base seconds: 0.12, otter seconds: 0.15 |" in text
    assert "| peak memory | 1.1x | base bytes: 1,000, otter bytes: 1,100 |" in text
    assert "dtype float32, threads 2" in text


def test_inserted_only_repo_is_small_names_its_base_and_loads_onto_it(fake_hub, tmp_path):
    put_base_on_hub(fake_hub, make_base("llama-gqa-tied"), "user/tiny-llama", tmp_path)
    otter = make_otter(AutoModelForCausalLM.from_pretrained("user/tiny-llama"))
    input_ids, attention_mask = random_batch(2, 6, "right")
    expected = _outputs(otter, input_ids, attention_mask)

    otter.push_to_hub("user/otter-only", otter_only=True, trained_on="preference pairs")
    repo_id, message, files = fake_hub.commits[-1]
    assert files == sorted(["README.md", OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME])
    pushed = fake_hub.files("user/otter-only")
    assert len(pushed[OTTER_WEIGHTS_NAME]) < 0.5 * os.path.getsize(tmp_path / "user--tiny-llama" / "model.safetensors")
    assert json.loads(pushed[OTTER_CONFIG_NAME])["base_model_name_or_path"] == "user/tiny-llama"
    card = ModelCard(pushed["README.md"].decode())
    assert card.data.base_model == "user/tiny-llama" and card.data.library_name == "otter-hf"
    assert 'otter_hf.load_otter(None, "user/otter-only")' in card.text

    reattached = otter_hf.load_otter(None, "user/otter-only")  # fetches user/tiny-llama from the Hub
    assert reattached.config.base_model_name_or_path == "user/tiny-llama"
    output = _outputs(reattached, input_ids, attention_mask)
    assert torch.equal(output.logits, expected.logits)
    torch.testing.assert_close(output.value, expected.value, atol=1e-5, rtol=1e-5)


def test_inserted_only_repo_refuses_a_base_with_other_weights(fake_hub, tmp_path):
    base = make_base("llama-gqa-tied")
    put_base_on_hub(fake_hub, make_base("llama-gqa-tied", seed=7), "user/retrained-llama", tmp_path)
    # The repository names a base of the same architecture and sizes but other weights.
    push_to_hub(make_otter(base), "user/otter-only", otter_only=True, base_model="user/retrained-llama")
    with pytest.raises(ValueError, match="weights differ"):
        otter_hf.load_otter(None, "user/otter-only")
    with pytest.raises(ValueError, match="weights differ"):
        otter_hf.load_otter(make_base("llama-gqa-tied", seed=8), "user/otter-only")
    assert otter_hf.load_otter(base, "user/otter-only").config.base_model_name_or_path == "user/retrained-llama"


def test_full_folder_pushed_as_inserted_only(fake_hub, tmp_path):
    otter = make_otter(make_base("mistral-sliding"))
    otter.save_pretrained(tmp_path / "saved")
    push_folder(tmp_path / "saved", "user/otter-only", otter_only=True, base_model="org/mistral")
    pushed = fake_hub.files("user/otter-only")
    assert sorted(pushed) == sorted(["README.md", OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME])
    assert json.loads(pushed[OTTER_CONFIG_NAME])["base_model_fingerprint"] == otter.base_weights_fingerprint()


@pytest.mark.parametrize(
    "setup, options, error, message",
    [
        (lambda folder: make_otter(make_base("llama-gqa-tied")).save_otter(folder), {}, ValueError, "pass the Hub id"),
        (
            lambda folder: make_otter(make_base("llama-gqa-tied")).save_otter(folder),
            {"otter_only": False},
            ValueError,
            "only inserted",
        ),
        (
            lambda folder: make_otter(make_base("llama-gqa-tied")).save_pretrained(folder),
            {"base_model": "not a repo id"},
            ValueError,
            "Hub repository id",
        ),
        (lambda folder: make_base("llama-gqa-tied").save_pretrained(folder), {}, ValueError, "not an Otter model"),
        (lambda folder: folder.mkdir(), {}, ValueError, "not a saved Otter model"),
        (lambda folder: None, {}, FileNotFoundError, "No folder"),
    ],
    ids=[
        "inserted-only-without-hub-base",
        "inserted-only-as-full",
        "bad-base-id",
        "plain-model",
        "empty-folder",
        "missing-folder",
    ],
)
def test_push_folder_explains_what_is_wrong(fake_hub, tmp_path, setup, options, error, message):
    folder = tmp_path / "saved"
    setup(folder)
    with pytest.raises(error, match=message):
        push_folder(folder, "user/otter", **options)
    assert fake_hub.commits == []


def test_load_otter_explains_a_missing_repo(fake_hub):
    with pytest.raises(OSError):
        otter_hf.load_otter(None, "user/never-pushed")
    with pytest.raises(ValueError, match="neither a folder nor a Hub repository id"):
        otter_hf.load_otter(None, "/no/such/folder")


@pytest.mark.parametrize(
    "leading, message",
    [("out", "notes.txt leads out of the checkpoint folder"), ("within", "notes.txt is a symbolic link")],
)
def test_a_folder_with_a_symbolic_link_is_not_uploaded(fake_hub, tmp_path, leading, message):
    otter = make_otter(make_base("llama-mha-untied"))
    otter.save_pretrained(tmp_path / "saved")
    secret = tmp_path / "outside" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("private key")
    (tmp_path / "saved" / "notes.txt").symlink_to(secret if leading == "out" else tmp_path / "saved" / "config.json")
    with pytest.raises(ValueError, match=message):
        push_folder(tmp_path / "saved", "user/otter", base_model="org/base")
    assert not os.path.exists(fake_hub.repo_folder("user/otter"))
