"""Vision-language bases: Otter in the language model; the vision tower, projector and LM head are the base's."""

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from packaging import version
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

import otter_hf
from otter_hf.modeling import OtterGemma3ForConditionalGeneration, OtterQwen3VLForConditionalGeneration

IMAGE_TOKEN = 90
# A 4x4-patch image, merged 2x2 into 4 image tokens, between text tokens.
PROMPT = [2, 5, 92, *[IMAGE_TOKEN] * 4, 93, 7, 8, 9]
TEXT_ONLY = [2, 5, 6, 7, 8, 9]


TEXT = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
    max_position_embeddings=128,
)


def make_qwen3_vl(seed=0, **overrides):
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
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


def make_gemma3(seed=0):
    # Sliding and full layers alternate; the window is shorter than the prompt.
    text = dict(TEXT, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16)
    config = Gemma3Config(
        text_config={**text, "query_pre_attn_scalar": 8},
        vision_config={**vision, "patch_size": 4},
        mm_tokens_per_image=4,
        image_token_id=IMAGE_TOKEN,
        boi_token_id=92,
        eoi_token_id=93,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers starts the projection at zero: every image would be the same features
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    return model


def qwen3_vl_image_inputs(input_ids, generator):
    batch_size = input_ids.shape[0]
    return dict(
        pixel_values=torch.randn(16 * batch_size, 3 * 2 * 4 * 4, generator=generator),
        image_grid_thw=torch.tensor([[1, 4, 4]] * batch_size),
        mm_token_type_ids=(input_ids == IMAGE_TOKEN).int(),
    )


def gemma3_image_inputs(input_ids, generator):
    return dict(
        pixel_values=torch.randn(input_ids.shape[0], 3, 16, 16, generator=generator),
        token_type_ids=(input_ids == IMAGE_TOKEN).long(),
    )


# Each family: its tiny base, its image inputs for token ids (a 4x4-patch image, 4 image tokens), its Otter class.
FAMILIES = {
    "qwen3_vl": (make_qwen3_vl, qwen3_vl_image_inputs, OtterQwen3VLForConditionalGeneration),
    "gemma3": (make_gemma3, gemma3_image_inputs, OtterGemma3ForConditionalGeneration),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


# transformers 5.19 renames a Gemma 3 checkpoint's language-model weights so that it reports the inserted ones
# unexpected: the load is refused (the inserted weights are checked after loading) rather than run without them.
GEMMA3_RELOADS = version.parse(transformers.__version__) >= version.parse("5.25")


def skip_unless_reloads(family):
    if family == "gemma3" and not GEMMA3_RELOADS:
        pytest.skip("Gemma 3 vision-language checkpoints reload from transformers 5.25 on (5.19 refuses them)")


def image_inputs(family, batch_size=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.tensor([PROMPT] * batch_size)
    return dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **FAMILIES[family][1](input_ids, generator)
    )


def make_base(family):
    return FAMILIES[family][0]()


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
def test_original_logits_are_the_bases_with_and_without_images(family, dtype, attention):
    base = make_base(family).to(dtype)
    base.set_attn_implementation(attention)
    otter = make_otter_vlm(make_base(family)).to(dtype)
    otter.set_attn_implementation(attention)
    assert type(otter) is FAMILIES[family][2]
    for inputs in (image_inputs(family, 2), text_inputs()):
        inputs = {k: v.to(dtype) if k == "pixel_values" else v for k, v in inputs.items()}
        with torch.no_grad():
            expected = base(**inputs)
            output = otter(**inputs)
        assert torch.equal(output.logits, expected.logits)
        assert output.value.shape == inputs["input_ids"].shape and output.value.isfinite().all()


def test_the_vision_model_is_the_bases_frozen_and_holds_no_inserted_parameter(family):
    otter = make_otter_vlm(make_base(family))
    base = make_base(family)
    vision = [name for name, _ in base.model.named_children() if name != "language_model"]
    assert vision
    for name, parameter in otter.model.named_parameters():
        if name.startswith(tuple(vision)):
            assert not parameter.requires_grad
            assert torch.equal(parameter, base.model.get_parameter(name))
    assert all(name.startswith(("model.language_model.", "v_head.")) for name, _ in otter.otter_named_parameters())


def test_the_image_reaches_the_value_at_the_text_positions_after_it(family):
    otter = make_otter_vlm(make_base(family))
    inputs = image_inputs(family)
    other = image_inputs(family, seed=1)
    with torch.no_grad():
        value = otter(**inputs).value
        other_value = otter(**other).value
    image_start = PROMPT.index(IMAGE_TOKEN)
    assert torch.equal(value[:, :image_start], other_value[:, :image_start])  # causal: before the image
    assert not torch.equal(value[:, -1], other_value[:, -1])


def test_generate_with_images_is_the_bases_and_takes_token_reward_guidance(family):
    base = make_base(family)
    otter = make_otter_vlm(make_base(family), token_reward_head=True)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = base.generate(**image_inputs(family), **settings)
    assert torch.equal(otter.generate(**image_inputs(family), **settings), expected)
    assert torch.equal(otter.generate(**image_inputs(family), token_reward_weight=0.0, **settings), expected)
    guided = otter.generate(**image_inputs(family), token_reward_weight=3.0, **settings)
    assert guided.shape == expected.shape
    with pytest.raises(ValueError, match="does not take these model inputs"):
        otter.generate(**image_inputs(family), reward_weight=1.0, **settings)


def test_save_and_reload_through_the_auto_class(family, tmp_path):
    skip_unless_reloads(family)
    otter = make_otter_vlm(make_base(family))
    otter.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(otter)
    with torch.no_grad():
        expected, output = otter(**image_inputs(family)), loaded(**image_inputs(family))
    assert torch.equal(output.logits, expected.logits) and torch.equal(output.value, expected.value)
    assert [name for name, p in loaded.named_parameters() if p.requires_grad] == [
        name for name, _ in loaded.otter_named_parameters()
    ]


def test_a_saved_checkpoint_loads_as_remote_code_without_otter_hf(family, tmp_path):
    skip_unless_reloads(family)
    otter = make_otter_vlm(make_base(family))
    otter.save_pretrained(tmp_path / "model")
    inputs = image_inputs(family)
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
    assert result.stdout.split() == [FAMILIES[family][2].__name__, "True", "True"], result.stderr[-2000:]


def test_inserting_into_a_vision_language_model_twice_is_refused():
    otter = make_otter_vlm(make_base("qwen3_vl"))
    with pytest.raises(ValueError, match="already is an Otter model"):
        otter_hf.insert(otter)


def test_a_checkpoint_missing_inserted_weights_is_refused(family, tmp_path):
    skip_unless_reloads(family)
    otter = make_otter_vlm(make_base(family))
    otter.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "inserted_mlp" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not hold the inserted weights.*inserted_mlp"):
        AutoModelForImageTextToText.from_pretrained(tmp_path)
