"""The inserted stream's own arithmetic: what it computes from the tensors the base hands its capture points."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotary
from transformers.models.olmo3.modeling_olmo3 import apply_rotary_pos_emb as olmo3_rotary
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rotary

from otter_hf.modeling.inserted_layer import HalfRotation, InsertedRMSNorm, NormCapture, ProjectionNorm


@pytest.mark.parametrize(
    "rotary_fn, rotary_dim",
    [(llama_rotary, 16), (phi3_rotary, 16), (phi3_rotary, 8)],
    ids=["llama", "phi3", "phi3-partial"],
)
def test_half_rotation_is_the_architectures_rotary_embedding_bit_for_bit(rotary_fn, rotary_dim):
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 5, 16, generator=generator), torch.randn(2, 1, 5, 16, generator=generator)
    # Tables whose two halves differ, unlike rotary frequencies, so that a swapped half cannot pass.
    cos, sin = torch.randn(2, 5, rotary_dim, generator=generator), torch.randn(2, 5, rotary_dim, generator=generator)
    expected_query, expected_key = rotary_fn(query, key, cos, sin)
    # The inserted heads rotate token-major states, (batch, positions, heads, head_dim).
    token_major = torch.cat([query, key], dim=1).transpose(1, 2)
    rotated = HalfRotation.rotate(token_major, HalfRotation.tables(cos, sin)).transpose(1, 2)
    assert torch.equal(rotated, torch.cat([expected_query, expected_key], dim=1))


def test_half_rotation_rotates_half_precision_heads_with_float32_tables_as_olmo_does():
    # OLMo 2/3 keep their rotary tables in float32 and cast the rotated heads back to their dtype.
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 5, 16, generator=generator).to(torch.bfloat16)
    key = torch.randn(2, 1, 5, 16, generator=generator).to(torch.bfloat16)
    cos, sin = torch.randn(2, 5, 16, generator=generator), torch.randn(2, 5, 16, generator=generator)
    expected_query, expected_key = olmo3_rotary(query, key, cos, sin)
    token_major = torch.cat([query, key], dim=1).transpose(1, 2)
    rotated = HalfRotation.rotate(token_major, HalfRotation.tables(cos, sin)).transpose(1, 2)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(rotated, torch.cat([expected_query, expected_key], dim=1))


def test_a_projection_norm_normalises_the_inserted_heads_with_the_original_projections_statistics():
    generator = torch.Generator().manual_seed(0)
    original_projection = torch.randn(2, 5, 4 * 8, generator=generator)
    inserted_heads = torch.randn(2, 5, 3, 8, generator=generator)
    weight = torch.randn(3 * 8, generator=generator)
    statistics = InsertedRMSNorm.statistics(original_projection, torch.tensor(1e-6))
    normalised = ProjectionNorm(InsertedRMSNorm, NormCapture(statistics, None, weight))(inserted_heads)
    expected = (
        weight * inserted_heads.flatten(-2) * torch.rsqrt(original_projection.pow(2).mean(-1, keepdim=True) + 1e-6)
    )
    assert normalised.shape == inserted_heads.shape
    torch.testing.assert_close(normalised.flatten(-2), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_statistic_is_the_inverse_root_mean_square_in_float32(dtype):
    original = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    eps = torch.tensor(1e-6)
    statistic = InsertedRMSNorm.statistics(original, eps)
    expected = torch.rsqrt(original.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert statistic.dtype == torch.float32
    torch.testing.assert_close(statistic, expected, rtol=1e-6, atol=0)
