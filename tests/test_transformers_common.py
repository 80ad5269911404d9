"""transformers' own common model tests (`ModelTesterMixin`, see transformers_model_tests.py) on the Otter classes of
every supported architecture, and on the architecture's own classes in the same run.

Each architecture gets two test classes, `Otter<Arch>CommonTest` (the Otter backbone, causal LM with value head and
sequence-classification view) and `<Arch>CommonTest` (transformers' model, causal LM and sequence classifier), with
the same tiny config and inputs. The only differences allowed are the Otter exceptions in `OTTER_EXCEPTIONS`.
"""

import functools
import unittest

import pytest
import transformers
from packaging import version
from transformers.models.auto import modeling_auto

from otter_hf.modeling import OTTER_ARCHITECTURES
from tests.helpers import ARCHITECTURE_BASES, BASE_MODELS, COMMON, random_batch
from tests.transformers_model_tests import load_test_modeling_common, registered_names

test_modeling_common = load_test_modeling_common()
ModelTesterMixin = test_modeling_common.ModelTesterMixin
# A stand-in without tests (see transformers_model_tests.py); the mixin checks that generative testers inherit it.
GenerationTesterMixin = test_modeling_common.GenerationTesterMixin

# The mixin's tests that transformers' own models fail on these tiny configs, by model type (transformers' test files
# for these families override them); the Otter classes of the family skip them as well.
BASE_EXCEPTIONS: dict[str, dict[str, str]] = {
    model_type: {
        "test_attention_outputs": (
            "its linear-attention layers return no attention weights, which the mixin's count of one per layer "
            "misses (transformers' own test of the family counts the full-attention layers)"
        )
    }
    for model_type in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
}
# transformers' Llama4ForCausalLM fails these whatever the config; the Otter causal LM passes them.
BASE_EXCEPTIONS["llama4_text"] = dict.fromkeys(
    ("test_model_base_model_prefix", "test_base_model_prefix_loads_base_weights"),
    "transformers' Llama4ForCausalLM declares the multimodal model's `base_model_prefix` (`language_model`) "
    "while it stores its backbone as `model`; the Otter causal LM declares `model`",
)

# The mixin's tests that Otter classes fail on purpose, each with its reason. The same tests pass on the base classes.
OTTER_EXCEPTIONS: dict[str, str] = {
    "test_attention_outputs": (
        "with `output_hidden_states` the inserted stream's hidden states come too (`inserted_hidden_states`), one "
        "field more than the base returns; the base's fields keep their positions"
    ),
    "test_training": (
        "the causal LM refuses LM `labels` while every parameter they could train is frozen, with an error naming "
        "the Otter trainers (the inserted parameters never change the logits)"
    ),
    "test_enable_input_require_grads_with_gradient_checkpointing": (
        "it passes LM `labels` to the frozen causal LM, refused as in test_training; tests/test_model_conventions.py "
        "checks checkpointing with trainable base parameters"
    ),
    **dict.fromkeys(
        (
            "test_training_gradient_checkpointing",
            "test_training_gradient_checkpointing_use_reentrant_false",
            "test_training_gradient_checkpointing_use_reentrant_true",
        ),
        "the LM loss does not reach the inserted parameters: they never change the original logits",
    ),
    "test_model_weights_reload_no_missing_tied_weights": (
        "an Otter checkpoint whose inserted weights are missing is refused rather than run on fresh values (a base "
        "checkpoint, or a save of the backbone alone, loads with them newly initialised)"
    ),
}


# The mixin's tests of what a model class promises its users, run by default on every architecture; the whole
# mixin (about 140 tests, 5-9 minutes per class on 2 busy cores) runs with `-m transformers_full`. The rest check
# kernels, compilation, offloading, attention dispatch and weight conversion, where the Otter classes are the base's.
CONVENTION_TESTS = frozenset(
    {
        "test_attention_outputs",
        "test_base_model_prefix_loads_base_weights",
        "test_batching_equivalence",
        "test_can_init_all_missing_weights",
        "test_can_use_safetensors",
        "test_correct_missing_keys",
        "test_determinism",
        "test_enable_input_require_grads_with_gradient_checkpointing",
        "test_from_pretrained_no_checkpoint",
        "test_hidden_states_output",
        "test_inputs_embeds",
        "test_keep_in_fp32_modules",
        "test_load_save_without_tied_weights",
        "test_model_base_model_prefix",
        "test_model_get_set_embeddings",
        "test_model_main_input_name",
        "test_model_outputs_equivalence",
        "test_model_weights_reload_no_missing_tied_weights",
        "test_resize_embeddings_untied",
        "test_resize_tokens_embeddings",
        "test_retain_grad_hidden_states_attentions",
        "test_save_load",
        "test_tied_weights_keys",
        "test_torch_save_load",
        "test_training",
        "test_training_gradient_checkpointing",
    }
)


def _full_only(test):
    @functools.wraps(test)
    def run(self):
        return test(self)

    return pytest.mark.transformers_full(run)


def _full_mixin_tests() -> dict:
    return {
        name: _full_only(getattr(ModelTesterMixin, name))
        for name in dir(ModelTesterMixin)
        if name.startswith("test_") and callable(getattr(ModelTesterMixin, name)) and name not in CONVENTION_TESTS
    }


class TinyModelTester:
    """What the mixin asks of a model tester: a tiny config of the architecture and a padded batch."""

    batch_size, seq_length = 2, 7
    is_training = True

    def __init__(self, config_class: type, sizes: dict):
        self.config_class, self.sizes = config_class, sizes
        config = self.get_config()
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads

    def get_config(self):
        return self.config_class(**{**COMMON, **self.sizes})

    def prepare_config_and_inputs_for_common(self):
        input_ids, attention_mask = random_batch(self.batch_size, self.seq_length, padding="left")
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class _CommonTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    __test__ = False  # the shared base holds no model classes of its own
    config_class: type
    sizes: dict
    model_type: str
    name_tables: tuple[type, type, type] | None = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if cls.name_tables is not None:
            names = registered_names(cls.model_type, *cls.name_tables)
            names.__enter__()
            cls.addClassCleanup(names.__exit__, None, None, None)

    def setUp(self):
        self.model_tester = TinyModelTester(self.config_class, self.sizes)


def _skip_exception(reason: str, kind: str = "Otter exception"):
    @unittest.skip(f"{kind}: {reason}")
    def skipped(self):
        pass

    return skipped


def _test_classes():
    classes = {}
    for base_name in ARCHITECTURE_BASES:
        base_config_class, _, sizes = BASE_MODELS[base_name]
        model_type = base_config_class.model_type
        causal_lm, view = next(
            (causal_lm, view)
            for causal_lm, view in OTTER_ARCHITECTURES
            if causal_lm.config_class.base_model_type == model_type
        )
        otter_config_class = causal_lm.config_class
        prefix = causal_lm.__name__.removesuffix("ForCausalLMWithValueHead")
        # The base's classes for the same roles; some families have no sequence-classification class (Granite).
        base_classes = tuple(
            getattr(transformers, table[model_type])
            for table in (
                modeling_auto.MODEL_MAPPING_NAMES,
                modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            )
            if model_type in table
        )
        classes[f"{prefix}CommonTest"] = type(
            f"{prefix}CommonTest",
            (_CommonTest,),
            {
                "__test__": True,
                "config_class": otter_config_class,
                "sizes": sizes,
                "model_type": otter_config_class.model_type,
                "all_model_classes": (causal_lm.backbone_class, causal_lm, view),
                "name_tables": (causal_lm.backbone_class, causal_lm, view),
                **_full_mixin_tests(),
                **{name: _skip_exception(reason) for name, reason in OTTER_EXCEPTIONS.items()},
            },
        )
        base_prefix = prefix.removeprefix("Otter")
        classes[f"{base_prefix}CommonTest"] = type(
            f"{base_prefix}CommonTest",
            (_CommonTest,),
            {
                "__test__": True,
                "config_class": base_config_class,
                "sizes": sizes,
                "model_type": model_type,
                "all_model_classes": base_classes,
                **_full_mixin_tests(),
                **{
                    name: _skip_exception(reason, "transformers' own model fails it")
                    for name, reason in BASE_EXCEPTIONS.get(model_type, {}).items()
                },
            },
        )
    return classes


globals().update(_test_classes())


def test_exceptions_and_selection_name_mixin_tests():
    """Each declared exception and selected test names a test the mixin has, so none goes stale when it is renamed
    (older releases lack the tests added since: `test_base_model_prefix_loads_base_weights` is new in 5.25)."""
    missing = {
        name
        for name in OTTER_EXCEPTIONS.keys()
        | CONVENTION_TESTS
        | {name for exceptions in BASE_EXCEPTIONS.values() for name in exceptions}
        if not callable(getattr(ModelTesterMixin, name, None))
    }
    added_since_the_oldest_release = {"test_base_model_prefix_loads_base_weights"}
    assert missing <= added_since_the_oldest_release
    if version.parse(transformers.__version__) >= version.parse("5.25"):
        assert not missing
