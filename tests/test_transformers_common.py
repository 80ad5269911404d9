"""transformers' own common model tests (`ModelTesterMixin`, see transformers_model_tests.py) on the Otter classes of
every supported architecture, and on the architecture's own classes in the same run.

Each architecture gets two test classes, `Otter<Arch>CommonTest` (the Otter backbone, causal LM with value head and
sequence-classification view) and `<Arch>CommonTest` (transformers' model, causal LM and sequence classifier), with
the same tiny config and inputs. The only differences allowed are the Otter exceptions in `OTTER_EXCEPTIONS`.
"""

import unittest

import transformers
from transformers.models.auto import modeling_auto

from otter_hf.modeling import OTTER_ARCHITECTURES
from tests.helpers import ARCHITECTURE_BASES, BASE_MODELS, COMMON, random_batch
from tests.transformers_model_tests import load_test_modeling_common, registered_names

test_modeling_common = load_test_modeling_common()
ModelTesterMixin = test_modeling_common.ModelTesterMixin
# A stand-in without tests (see transformers_model_tests.py); the mixin checks that generative testers inherit it.
GenerationTesterMixin = test_modeling_common.GenerationTesterMixin

# The mixin's tests that Otter classes fail on purpose, each with its reason. The same tests pass on the base classes.
OTTER_EXCEPTIONS: dict[str, str] = {}


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


def _skip_exception(reason: str):
    @unittest.skip(f"Otter exception: {reason}")
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
        base_classes = tuple(
            getattr(transformers, table[model_type])
            for table in (
                modeling_auto.MODEL_MAPPING_NAMES,
                modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            )
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
            },
        )
    return classes


globals().update(_test_classes())


def test_exceptions_are_mixin_tests():
    """Each declared exception names a test the mixin has, so a renamed test cannot leave a stale exception."""
    assert all(callable(getattr(ModelTesterMixin, name, None)) for name in OTTER_EXCEPTIONS)
