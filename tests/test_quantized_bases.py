"""Otter on a quantized base: bitsandbytes (8-bit, 4-bit), torchao (int8 weight-only) and quanto (int8 weights).

The original output is the quantized base's own, bit for bit; the inserted parameters stay float and train; saves
rebuild the quantized base; loading with a `quantization_config` quantizes the base only. Each backend's tests are
skipped when its package is not installed (none of them is a dependency of otter_hf).
"""

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
    QuantoConfig,
    TorchAoConfig,
)

import otter_hf
from otter_hf.modeling.initialization import copied_head_sources
from otter_hf.modeling.quantization import dequantized, is_quantized_tensor
from otter_hf.trainers import OtterRewardConfig, OtterRewardTrainer
from tests.helpers import conversational_pairs, make_base, random_batch, trainer_config


def _torchao_config():
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


# Backend -> (the package it needs, its quantization config).
BACKENDS = {
    "bnb-4bit": ("bitsandbytes", lambda: BitsAndBytesConfig(load_in_4bit=True)),
    "bnb-8bit": ("bitsandbytes", lambda: BitsAndBytesConfig(load_in_8bit=True)),
    "quanto-int8": ("optimum.quanto", lambda: QuantoConfig(weights="int8")),
    "torchao-int8": ("torchao", _torchao_config),
}
# bitsandbytes' 4-bit CPU kernels repack a layer's weights on its first forward, after which their values cannot be
# read back exactly (`dequantized` refuses): saving (which fingerprints the base) is left to a GPU.
SAVED = ("bnb-8bit", "quanto-int8", "torchao-int8")
# transformers saves these quantized models whole (quanto's are not serializable).
SERIALIZABLE = ("bnb-8bit", "torchao-int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def longer_test_backends(backends) -> list:
    """`backends` as parameters of a longer test: torchao's runs by default, the others with -m slow."""
    return [
        backend if backend == "torchao-int8" else pytest.param(backend, marks=pytest.mark.slow) for backend in backends
    ]


def quantization_config(backend: str):
    package, make_config = BACKENDS[backend]
    pytest.importorskip(package, reason=f"{package} is not installed (pip install {package.replace('.', '-')})")
    return make_config()


@pytest.fixture
def base_folder(tmp_path):
    """A tiny Llama base; its sizes are multiples of 64, which bitsandbytes' 4-bit CPU kernels need."""
    folder = tmp_path / "base"
    make_base("llama-gqa-tied", intermediate_size=128).save_pretrained(folder)
    return folder


def load_quantized(folder, backend: str, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization_config(backend), dtype=dtype)


def noisy(model, noise: float = 0.05):
    """Real values in the zero-initialised inserted blocks, so every inserted path runs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.otter_parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return model


def outputs(model, *inputs):
    with torch.no_grad():
        return model(*inputs[:1], attention_mask=inputs[1])


def is_quantized_module(module: nn.Module) -> bool:
    """A quantizer's layer (bitsandbytes', quanto's) or a layer holding a quantized weight (torchao's)."""
    from_quantizer = type(module).__module__.split(".")[0] in ("bitsandbytes", "optimum")
    return from_quantizer or is_quantized_tensor(module.weight)


def check_inserted_float_and_base_quantized(model, dtype) -> None:
    layer = model.model.layers[0]
    assert is_quantized_module(layer.self_attn.o_proj) and is_quantized_module(layer.mlp.down_proj)
    for module in (layer.inserted_attn.qkv_proj, layer.inserted_attn.o_proj, layer.inserted_mlp.down_proj):
        assert not is_quantized_module(module)
    for name, parameter in model.otter_named_parameters():
        assert not is_quantized_tensor(parameter), name
        expected = torch.float32 if name.startswith("v_head.") else dtype
        assert parameter.dtype == expected and parameter.requires_grad, name


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_original_output_is_the_quantized_bases(base_folder, backend, dtype_name):
    dtype = DTYPES[dtype_name]
    base = load_quantized(base_folder, backend, dtype)
    inputs = random_batch(3, 9, "left")
    # Inserted before the base runs, which bitsandbytes' 4-bit CPU kernels need (see SAVED); the base object still
    # computes on its own modules, which the Otter model shares.
    model = noisy(otter_hf.insert(base))
    expected = outputs(base, *inputs).logits
    check_inserted_float_and_base_quantized(model, dtype)
    result = outputs(model, *inputs)
    assert torch.equal(result.logits, expected)
    assert torch.isfinite(result.value).all()
    with torch.no_grad():
        kept = model(inputs[0], attention_mask=inputs[1], logits_to_keep=1).logits
        assert torch.equal(kept, base(inputs[0], attention_mask=inputs[1], logits_to_keep=1).logits)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_copy_initialisation_dequantizes_the_rows_it_copies(base_folder, backend):
    model = otter_hf.insert(load_quantized(base_folder, backend), init="copy")
    config, layer = model.config, model.model.layers[1]
    head_dim = config.hidden_size // config.num_attention_heads
    source = copied_head_sources(config)[0][0]
    query = dequantized(layer.self_attn.q_proj.weight, layer.self_attn.q_proj)
    copied = layer.inserted_attn.qkv_proj.weight[:head_dim, : config.hidden_size]
    assert torch.equal(copied, query[source * head_dim : (source + 1) * head_dim].to(copied.dtype))
    assert copied.abs().sum() > 0


# bitsandbytes' CPU kernels fail in DeepSeek's own forward on this tiny config: 4-bit wants output widths that are
# multiples of its block, 8-bit a 2-D or 3-D input where `kv_b_proj` takes a 4-D one.
@pytest.mark.parametrize("backend", ["quanto-int8", "torchao-int8"])
def test_latent_attention_copies_the_dequantized_latent_expansions(tmp_path, backend):
    folder = tmp_path / "base"
    make_base("deepseekv3-latent-attention").save_pretrained(folder)
    base = load_quantized(folder, backend)
    inputs = random_batch(2, 7, "left")
    expected = outputs(base, *inputs).logits
    model = otter_hf.insert(base, init="copy")
    assert torch.equal(outputs(model, *inputs).logits, expected)
    config, layer = model.config, model.model.layers[1]
    attention, qkv = layer.self_attn, layer.inserted_attn.qkv_proj.weight
    assert is_quantized_module(attention.q_b_proj) and is_quantized_module(attention.kv_b_proj)
    query_sources, kv_sources = copied_head_sources(config)
    head_dim, nope = config.qk_nope_head_dim + config.qk_rope_head_dim, config.qk_nope_head_dim
    # The inserted heads read [h_n, query latent, key/value latent, g_n].
    query_latent = slice(config.hidden_size, config.hidden_size + config.q_lora_rank)
    kv_latent = slice(query_latent.stop, query_latent.stop + config.kv_lora_rank)
    # The first copied head's query: its source's rows of q_b_proj on the query latent.
    q_b = dequantized(attention.q_b_proj.weight, attention.q_b_proj)
    source = query_sources[0]
    assert torch.equal(qkv[:head_dim, query_latent], q_b[source * head_dim : (source + 1) * head_dim])
    # The first copied value: its source's value rows of kv_b_proj (after the head's key rows) on the latent.
    kv_b = dequantized(attention.kv_b_proj.weight, attention.kv_b_proj)
    kv_b = kv_b.view(config.num_attention_heads, nope + config.v_head_dim, config.kv_lora_rank)
    value_row = (len(query_sources) + len(kv_sources)) * head_dim
    copied_value = qkv[value_row : value_row + config.v_head_dim, kv_latent]
    assert torch.equal(copied_value, kv_b[kv_sources[0], nope:])
    assert copied_value.abs().sum() > 0


@pytest.mark.parametrize("backend", longer_test_backends(sorted(BACKENDS)))
def test_reward_trainer_trains_the_inserted_parameters_on_a_quantized_base(tmp_path, base_folder, backend):
    base = load_quantized(base_folder, backend)
    inputs = random_batch(2, 8)
    torch.manual_seed(0)
    model = otter_hf.insert(base)
    expected = outputs(base, *inputs).logits
    before = {name: parameter.detach().clone() for name, parameter in model.otter_named_parameters()}
    trainer = OtterRewardTrainer(
        model,
        args=trainer_config(OtterRewardConfig, tmp_path, max_steps=3),
        train_dataset=conversational_pairs(8),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    model.eval()  # as the base ran (bitsandbytes' 8-bit layers compute otherwise in training mode)
    assert not torch.equal(model.v_head.summary.weight, before["v_head.summary.weight"])
    changed = [name for name, parameter in model.otter_named_parameters() if not torch.equal(parameter, before[name])]
    assert any(name.startswith("model.layers.") for name in changed)
    check_inserted_float_and_base_quantized(model, torch.float32)
    assert torch.equal(outputs(model, *inputs).logits, expected)


def trainer_runs(model_for, tmp_path):
    """Each other Otter trainer on `model_for(insert options)`, two steps on its own kind of data."""
    from trl.data_utils import unpair_preference_dataset

    from otter_hf.trainers import (
        OtterDraftTrainer,
        OtterExpertConfig,
        OtterExpertTrainer,
        OtterTokenRewardConfig,
        OtterTokenRewardTrainer,
        OtterValueConfig,
        OtterValueTrainer,
    )
    from tests.helpers import draft_config
    from tests.test_draft_trainer import self_distilled
    from tests.test_expert_heads import text_corpora

    tokenizer = tiny_tokenizer()

    def value():
        model = model_for({})
        args = trainer_config(OtterValueConfig, tmp_path, max_steps=2)
        dataset = unpair_preference_dataset(conversational_pairs(8))
        return model, OtterValueTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)

    def token_reward():
        model = model_for({"token_reward_head": True})
        args = trainer_config(OtterTokenRewardConfig, tmp_path, max_steps=2)
        return model, OtterTokenRewardTrainer(
            model, args=args, train_dataset=conversational_pairs(8), processing_class=tokenizer
        )

    def expert():
        model = model_for({"expert_heads": True})
        args = trainer_config(OtterExpertConfig, tmp_path, max_steps=2)
        return model, OtterExpertTrainer(model, args=args, train_dataset=text_corpora(), processing_class=tokenizer)

    def draft():
        model = model_for({"num_draft_heads": 2})
        dataset = self_distilled(model, tokenizer)
        return model, OtterDraftTrainer(
            model, draft_config(tmp_path, max_steps=2), train_dataset=dataset, processing_class=tokenizer
        )

    return {"value": value, "token_reward": token_reward, "expert": expert, "draft": draft}


@pytest.mark.parametrize("trainer_name", ["value", "token_reward", "expert", "draft"])
def test_every_other_trainer_trains_the_inserted_parameters_on_a_quantized_base(tmp_path, base_folder, trainer_name):
    inputs = random_batch(2, 8)
    bases = []

    def model_for(options):
        bases.append(load_quantized(base_folder, "torchao-int8"))
        torch.manual_seed(0)
        return otter_hf.insert(bases[-1], **options)

    model, trainer = trainer_runs(model_for, tmp_path)[trainer_name]()
    expected = outputs(bases[-1], *inputs).logits
    before = {name: parameter.detach().clone() for name, parameter in model.otter_named_parameters()}
    trainer.train()
    model.eval()
    changed = [name for name, parameter in model.otter_named_parameters() if not torch.equal(parameter, before[name])]
    assert changed  # each trainer freezes what it does not fit (the value head, for the head trainers)
    layer = model.model.layers[0]
    assert is_quantized_module(layer.self_attn.o_proj) and is_quantized_module(layer.mlp.down_proj)
    assert not any(is_quantized_tensor(parameter) for parameter in model.otter_parameters())
    assert torch.equal(outputs(model, *inputs).logits, expected)


def tiny_tokenizer():
    from tests.helpers import make_tokenizer

    return make_tokenizer()


@pytest.mark.parametrize("backend", longer_test_backends(SAVED))
def test_save_otter_records_the_quantization_and_load_otter_rebuilds_it(tmp_path, base_folder, backend):
    model = noisy(otter_hf.insert(load_quantized(base_folder, backend)))
    inputs = random_batch(2, 8, "right")
    expected = outputs(model, *inputs)
    model.save_otter(tmp_path / "otter")

    loaded = otter_hf.load_otter(str(base_folder), tmp_path / "otter")
    check_inserted_float_and_base_quantized(loaded, torch.float32)
    result = outputs(loaded, *inputs)
    assert torch.equal(result.logits, expected.logits)
    assert torch.equal(result.value, expected.value)

    unquantized = AutoModelForCausalLM.from_pretrained(base_folder)
    with pytest.raises(ValueError, match="quantized with .* this base is unquantized"):
        otter_hf.load_otter(unquantized, tmp_path / "otter")


@pytest.mark.parametrize("backend", longer_test_backends(SERIALIZABLE))
def test_a_whole_save_reloads_with_the_base_quantized_and_the_inserted_modules_not(tmp_path, base_folder, backend):
    model = noisy(otter_hf.insert(load_quantized(base_folder, backend)))
    inputs = random_batch(2, 8)
    expected = outputs(model, *inputs)
    model.save_pretrained(tmp_path / "whole")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "whole")
    check_inserted_float_and_base_quantized(loaded, torch.float32)
    result = outputs(loaded, *inputs)
    assert torch.equal(result.logits, expected.logits)
    assert torch.equal(result.value, expected.value)


def test_quanto_model_saved_whole_is_refused_with_the_way_to_save_it(tmp_path, base_folder):
    model = otter_hf.insert(load_quantized(base_folder, "quanto-int8"))
    with pytest.raises(ValueError, match=r"quanto.*save_otter"):
        model.save_pretrained(tmp_path / "whole")
    assert not (tmp_path / "whole" / "config.json").exists()


@pytest.mark.parametrize("backend", longer_test_backends(sorted(BACKENDS)))
def test_loading_with_a_quantization_config_quantizes_the_base_only(tmp_path, base_folder, backend):
    model = noisy(otter_hf.insert(AutoModelForCausalLM.from_pretrained(base_folder)))
    model.save_pretrained(tmp_path / "float")
    config = quantization_config(backend)
    skipped_by_user = list(getattr(config, "modules_to_not_convert", None) or [])

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    check_inserted_float_and_base_quantized(loaded, torch.float32)
    # The caller's config is left as it was: otter_hf adds the inserted modules to a copy.
    assert list(getattr(config, "modules_to_not_convert", None) or []) == skipped_by_user
    # The same base weights quantized the same way: the quantized base's output, and the inserted stream runs.
    inputs = random_batch(2, 8)
    result = outputs(loaded, *inputs)
    assert torch.equal(result.logits, outputs(load_quantized(base_folder, backend), *inputs).logits)
    assert torch.isfinite(result.value).all()


@pytest.mark.parametrize("base_name", ["gemma4-per-layer-shared-kv", "gemma4-moe"])
@pytest.mark.parametrize("backend", longer_test_backends(SAVED))
def test_gemma4_per_layer_shapes_and_capture_points_on_a_quantized_base(tmp_path, backend, base_name):
    """Gemma 4's layers differ in head size and key/value heads, and hold a per-layer input projection:
    copy-initialisation reads each layer's dequantized weights in that layer's shape, and a quantizing load hooks
    the per-layer inputs and the experts' and dense MLP's sum again on the modules the quantizer put in place."""
    folder = tmp_path / "base"
    make_base(base_name).save_pretrained(folder)
    base = load_quantized(folder, backend)
    model = otter_hf.insert(base, init="copy")
    config = model.config
    for index, layer in enumerate(model.model.layers):
        shape = model.model.otter_layout.attention_shape(config, index)
        source = copied_head_sources(config, shape.num_key_value_heads)[0][0]
        assert is_quantized_module(layer.self_attn.q_proj)
        query = dequantized(layer.self_attn.q_proj.weight, layer.self_attn.q_proj)
        copied = layer.inserted_attn.qkv_proj.weight[: shape.head_dim, : config.hidden_size]
        assert torch.equal(copied, query[source * shape.head_dim : (source + 1) * shape.head_dim])
        if config.hidden_size_per_layer_input:
            assert is_quantized_module(layer.per_layer_projection)
            inserted = layer.inserted_per_layer_input.proj.weight
            projection = dequantized(layer.per_layer_projection.weight, layer.per_layer_projection)
            assert torch.equal(inserted, projection[: inserted.shape[0]]) and inserted.abs().sum() > 0
    inputs = random_batch(2, 9, "left")
    noisy(model)
    assert torch.equal(outputs(model, *inputs).logits, outputs(base, *inputs).logits)

    noisy(otter_hf.insert(AutoModelForCausalLM.from_pretrained(folder))).save_pretrained(tmp_path / "float")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=quantization_config(backend))
    result = outputs(loaded, *inputs)
    assert torch.equal(result.logits, outputs(load_quantized(folder, backend), *inputs).logits)
    assert torch.isfinite(result.value[inputs[1].bool()]).all()


def test_bnb_4bit_weights_repacked_by_a_cpu_forward_are_refused_clearly(base_folder):
    base = load_quantized(base_folder, "bnb-4bit")
    outputs(base, *random_batch(1, 4))
    with pytest.raises(ValueError, match="repacked for bitsandbytes' CPU kernels"):
        otter_hf.insert(base)


def test_an_unsupported_quantization_method_is_refused_by_name(base_folder):
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    base.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="quantized with 'gptq'.*bitsandbytes, quanto, torchao"):
        otter_hf.insert(base)


@pytest.mark.parametrize("backend", ["quanto-int8", "torchao-int8"])
def test_a_quantized_vision_language_base_keeps_its_logits_and_reloads_quantized(tmp_path, backend):
    """quanto replaces the language model's linear layers by its own, torchao keeps them: the capture hooks of the
    Otter language model follow either, on insertion and on loading with a quantization config."""
    from tests.test_vision_language import image_inputs
    from tests.test_vision_language import make_base as make_vision_language_base

    make_vision_language_base("qwen3_vl").save_pretrained(tmp_path / "base")
    inputs = image_inputs("qwen3_vl")
    quantized = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "base", quantization_config=quantization_config(backend)
    )
    with torch.no_grad():
        expected = quantized(**inputs).logits
    model = noisy(otter_hf.insert(quantized))
    assert is_quantized_module(model.model.language_model.layers[0].self_attn.o_proj)
    with torch.no_grad():
        result = model(**inputs)
    assert torch.equal(result.logits, expected) and torch.isfinite(result.value).all()

    float_model = noisy(otter_hf.insert(AutoModelForImageTextToText.from_pretrained(tmp_path / "base")))
    float_model.save_pretrained(tmp_path / "otter")
    loaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "otter", quantization_config=quantization_config(backend)
    )
    layer = loaded.model.language_model.layers[0]
    assert is_quantized_module(layer.self_attn.o_proj) and not is_quantized_module(layer.inserted_attn.o_proj)
    with torch.no_grad():
        reloaded = loaded(**inputs)
    assert torch.equal(reloaded.logits, expected) and torch.isfinite(reloaded.value).all()
