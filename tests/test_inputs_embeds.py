"""`inputs_embeds`: the base computes the original stream from them; the inserted stream starts from their first
`inserted_hidden_size` dimensions, or from the token's inserted embedding where the forward embedded a token id."""

import pytest
import torch
from peft import PromptTuningConfig, get_peft_model

import otter_hf
from otter_hf.modeling import sequence_classification_view
from otter_hf.modeling.sequence_classification import pool_last_token
from tests.helpers import ARCHITECTURE_BASES, make_base, make_otter, random_batch


def _soft_embeddings(model, input_ids, seed=3):
    """The token embeddings of `input_ids` with the first two positions replaced by arbitrary vectors; where the
    base has per-layer inputs (Gemma 4), which it computes from the token ids it recovers from `inputs_embeds` and
    so takes only embeddings of tokens, the embeddings of other tokens."""
    embeddings = model.get_input_embeddings()(input_ids).detach().clone()
    if getattr(model.config, "hidden_size_per_layer_input", 0):
        return model.get_input_embeddings()(input_ids.roll(1, dims=1)).detach().clone()
    generator = torch.Generator().manual_seed(seed)
    embeddings[:, :2] = torch.randn(embeddings[:, :2].shape, generator=generator).to(embeddings.dtype)
    return embeddings


@pytest.mark.parametrize("base_name", ARCHITECTURE_BASES)
def test_original_logits_from_inputs_embeds_are_the_bases(base_name):
    base = make_base(base_name)
    otter = make_otter(make_base(base_name))
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    embeddings = _soft_embeddings(base, input_ids)
    with torch.no_grad():
        expected = base(inputs_embeds=embeddings, attention_mask=attention_mask).logits
        output = otter(inputs_embeds=embeddings, attention_mask=attention_mask)
    assert torch.equal(output.logits, expected)
    assert output.value.shape == input_ids.shape and output.value.isfinite().all()


@pytest.mark.parametrize("base_name", ARCHITECTURE_BASES)
def test_embeddings_of_the_ids_give_the_ids_value_while_the_inserted_embedding_is_the_copied_columns(base_name):
    otter = make_otter(make_base(base_name))
    embedding = otter.get_input_embeddings()
    with torch.no_grad():  # every other inserted parameter keeps its noise
        embedding.inserted_weight.copy_(embedding.weight[:, : otter.config.inserted_hidden_size])
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    with torch.no_grad():
        from_ids = otter(input_ids=input_ids, attention_mask=attention_mask)
        from_embeddings = otter(inputs_embeds=embedding(input_ids), attention_mask=attention_mask)
        with otter.otter_disabled():
            embedding.inserted_weight.mul_(2)  # a trained inserted embedding: no longer what embeddings give
        changed = otter(inputs_embeds=embedding(input_ids), attention_mask=attention_mask)
    assert torch.equal(from_embeddings.logits, from_ids.logits)
    assert torch.equal(from_embeddings.value, from_ids.value)
    assert torch.equal(changed.value, from_embeddings.value)  # inputs_embeds alone never read the inserted rows


def test_a_forward_that_embeds_ids_then_replaces_rows_starts_the_inserted_stream_from_both():
    """What a vision-language model does: embed the text, put image features in place of some rows."""
    otter = make_otter(make_base("llama-gqa-tied"))
    backbone, embedding = otter.base_model, otter.get_input_embeddings()
    size = otter.config.inserted_hidden_size
    input_ids, _ = random_batch(1, 5)
    features = torch.randn(1, 2, otter.config.hidden_size)
    image_positions = torch.tensor([False, True, True, False, False])[None, :, None]
    with torch.no_grad(), backbone.inserted_stream(record_hidden_states=True) as stream:
        embeddings = embedding(input_ids)
        backbone(inputs_embeds=embeddings.masked_scatter(image_positions, features))
    entering = stream.hidden_states[0]
    inserted_of_ids = torch.nn.functional.embedding(input_ids, embedding.inserted_weight)
    assert torch.equal(entering[:, [0, 3, 4]], inserted_of_ids[:, [0, 3, 4]])
    assert torch.equal(entering[:, 1:3], features[..., :size])
    with pytest.raises(RuntimeError, match="changed in place"), torch.no_grad(), backbone.inserted_stream():
        embeddings = embedding(input_ids)
        embeddings[:, 1:3] = features
        backbone(inputs_embeds=embeddings)


def test_the_backbone_takes_inputs_embeds_as_the_causal_lm_does():
    otter = make_otter(make_base("llama-gqa-tied"))
    input_ids, _ = random_batch(1, 4)
    embeddings = _soft_embeddings(otter, input_ids)
    with torch.no_grad():
        backbone_output = otter.base_model(inputs_embeds=embeddings)
        original, inserted, _ = otter.final_streams(inputs_embeds=embeddings)
    assert torch.equal(backbone_output.last_hidden_state, original)
    assert torch.equal(backbone_output.inserted_last_hidden_state, inserted)


def test_the_sequence_classification_view_scores_inputs_embeds_as_the_causal_lm_values_them():
    otter = make_otter(make_base("llama-gqa-tied"))
    view = sequence_classification_view(otter)
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    embeddings = _soft_embeddings(otter, input_ids)
    with torch.no_grad():
        scores = view(inputs_embeds=embeddings, attention_mask=attention_mask).logits
        values = otter(inputs_embeds=embeddings, attention_mask=attention_mask).value
        scores_of_ids = view(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(scores, pool_last_token(values, attention_mask).unsqueeze(-1))
    assert not torch.equal(scores, scores_of_ids)  # the soft positions reach the score


def test_generate_from_inputs_embeds_is_the_bases_and_continues_from_ids():
    base = make_base("llama-gqa-tied")
    otter = make_otter(make_base("llama-gqa-tied"), token_reward_head=True)
    input_ids, attention_mask = random_batch(2, 5, padding="left")
    embeddings = _soft_embeddings(base, input_ids)
    settings = dict(attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = base.generate(inputs_embeds=embeddings, **settings)
    assert torch.equal(otter.generate(inputs_embeds=embeddings, **settings), expected)
    guided = otter.generate(inputs_embeds=embeddings, token_reward_weight=0.5, **settings)
    assert guided.shape == expected.shape


def test_trainable_inputs_embeds_train_through_the_original_logits_and_the_value():
    otter = make_otter(make_base("llama-gqa-tied"))
    input_ids, _ = random_batch(1, 5)
    embeddings = _soft_embeddings(otter, input_ids).requires_grad_()
    output = otter(inputs_embeds=embeddings, labels=input_ids)
    (output.loss + output.value.sum()).backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert otter.v_head.summary.weight.grad is not None


def test_peft_prompt_tuning_trains_soft_prompts_on_an_otter_model():
    base = make_base("llama-gqa-tied")
    otter = otter_hf.insert(make_base("llama-gqa-tied"))
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    torch.manual_seed(0)
    tuned_base = get_peft_model(base, config)
    torch.manual_seed(0)
    tuned = get_peft_model(otter, config)
    input_ids, attention_mask = random_batch(2, 5)
    output = tuned(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    expected = tuned_base(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    assert torch.equal(output.logits, expected.logits)
    assert output.value.shape == (2, 3 + 5)
    output.loss.backward()
    prompts = tuned.prompt_encoder["default"].embedding.weight
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    generated = tuned.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert generated.shape[-1] >= input_ids.shape[-1] + 1
