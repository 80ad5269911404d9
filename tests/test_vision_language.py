"""Vision-language bases: Otter in the language model; the vision tower, projector and LM head are the base's."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, Qwen3VLConfig, Qwen3VLForConditionalGeneration

import otter_hf
from otter_hf.modeling import OtterQwen3VLForConditionalGeneration

IMAGE_TOKEN = 90
# A 4x4-patch image, merged 2x2 into 4 image tokens, between text tokens.
PROMPT = [2, 5, 92, *[IMAGE_TOKEN] * 4, 93, 7, 8, 9]
TEXT_ONLY = [2, 5, 6, 7, 8, 9]


def make_qwen3_vl(seed=0, **overrides):
    text = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        max_position_embeddings=128,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=32,
        deepstack_visual_indexes=[0],
        num_position_embeddings=16,
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=91,
        vision_start_token_id=92,
        vision_end_token_id=93,
        **overrides,
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def image_inputs(batch_size=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.tensor([PROMPT] * batch_size)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(16 * batch_size, 3 * 2 * 4 * 4, generator=generator),
        image_grid_thw=torch.tensor([[1, 4, 4]] * batch_size),
        mm_token_type_ids=(input_ids == IMAGE_TOKEN).int(),
    )


def text_inputs():
    input_ids = torch.tensor([TEXT_ONLY])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def make_otter_vlm(base, noise=0.05, **options):
    torch.manual_seed(1)
    otter = otter_hf.insert(base, **options)
    with torch.no_grad():
        for parameter in otter.otter_parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return otter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_original_logits_are_the_bases_with_and_without_images(dtype, attention):
    base = make_qwen3_vl().to(dtype)
    base.set_attn_implementation(attention)
    otter = make_otter_vlm(make_qwen3_vl()).to(dtype)
    otter.set_attn_implementation(attention)
    assert isinstance(otter, OtterQwen3VLForConditionalGeneration)
    for inputs in (image_inputs(2), text_inputs()):
        inputs = {k: v.to(dtype) if k == "pixel_values" else v for k, v in inputs.items()}
        with torch.no_grad():
            expected = base(**inputs)
            output = otter(**inputs)
        assert torch.equal(output.logits, expected.logits)
        assert output.value.shape == inputs["input_ids"].shape and output.value.isfinite().all()


def test_the_vision_tower_is_the_bases_frozen_and_holds_no_inserted_parameter():
    otter = make_otter_vlm(make_qwen3_vl())
    base = make_qwen3_vl()
    for name, parameter in otter.model.visual.named_parameters():
        assert not parameter.requires_grad
        assert torch.equal(parameter, base.model.visual.get_parameter(name))
    assert all(name.startswith(("model.language_model.", "v_head.")) for name, _ in otter.otter_named_parameters())


def test_the_image_reaches_the_value_at_the_text_positions_after_it():
    otter = make_otter_vlm(make_qwen3_vl())
    inputs = image_inputs()
    other = image_inputs(seed=1)
    with torch.no_grad():
        value = otter(**inputs).value
        other_value = otter(**other).value
    image_start = PROMPT.index(IMAGE_TOKEN)
    assert torch.equal(value[:, :image_start], other_value[:, :image_start])  # causal: before the image
    assert not torch.equal(value[:, -1], other_value[:, -1])


def test_generate_with_images_is_the_bases_and_takes_token_reward_guidance():
    base = make_qwen3_vl()
    otter = make_otter_vlm(make_qwen3_vl(), token_reward_head=True)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = base.generate(**image_inputs(), **settings)
    assert torch.equal(otter.generate(**image_inputs(), **settings), expected)
    assert torch.equal(otter.generate(**image_inputs(), token_reward_weight=0.0, **settings), expected)
    guided = otter.generate(**image_inputs(), token_reward_weight=3.0, **settings)
    assert guided.shape == expected.shape
    with pytest.raises(ValueError, match="does not take these model inputs"):
        otter.generate(**image_inputs(), reward_weight=1.0, **settings)


def test_save_and_reload_through_the_auto_class(tmp_path):
    otter = make_otter_vlm(make_qwen3_vl())
    otter.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(otter)
    with torch.no_grad():
        expected, output = otter(**image_inputs()), loaded(**image_inputs())
    assert torch.equal(output.logits, expected.logits) and torch.equal(output.value, expected.value)
    assert all(not p.requires_grad for p in loaded.model.visual.parameters())


def test_a_saved_checkpoint_loads_as_remote_code_without_otter_hf(tmp_path):
    otter = make_otter_vlm(make_qwen3_vl())
    otter.save_pretrained(tmp_path / "model")
    inputs = image_inputs()
    with torch.no_grad():
        output = otter(**inputs)
    save_file({**inputs, "logits": output.logits, "value": output.value}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "otter_hf":
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Block())
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText
        expected = load_file(sys.argv[2])
        model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        inputs = {k: v for k, v in expected.items() if k not in ("logits", "value")}
        with torch.no_grad():
            output = model(**inputs)
        print(type(model).__name__, torch.equal(output.logits, expected["logits"]),
              torch.equal(output.value, expected["value"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model"), str(tmp_path / "expected.safetensors")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.stdout.split() == ["OtterQwen3VLForConditionalGeneration", "True", "True"], result.stderr[-2000:]


def test_inserting_into_a_vision_language_model_twice_is_refused():
    otter = make_otter_vlm(make_qwen3_vl())
    with pytest.raises(ValueError, match="already is an Otter model"):
        otter_hf.insert(otter)
