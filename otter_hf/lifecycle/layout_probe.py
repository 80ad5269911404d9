"""Whether a derived layout fits a base: one probe forward of a copy-initialised Otter model beside the base.

A layout derived from module names (`otter_hf.modeling.derived_layout`) is only used once the probe shows, on the
base model itself:

- the original logits are bit-identical to the base's (`torch.equal`);
- every capture point fired: the forward completes without `CapturePointMissed`;
- the copy-initialised inserted stream follows the original dimensions it copies, layer after layer, as it does on
  every registered architecture (`tests/test_insert.py`);
- each copy-initialised inserted head's rotated (and normalised) query and key are its source head's, its output
  is its source's, and the inserted units of a dense layer are the units they copy: the stream follows without
  them (at insertion their output weights are zero), so a rotation, q/k norm, window or activation the layout
  applies otherwise shows only here;
- the LM head's output, processed as the derived causal LM does for draft heads, is the base's logits.

Anything else raises `LayoutNotDerived`, naming where the layout and the base part.
"""

import contextlib

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..modeling.derived_layout import LayoutNotDerived
from ..modeling.initialization import copied_head_sources
from ..modeling.inserted_stream import CapturePointMissed

PROBE_TOKENS = 32
# The largest relative difference between the copy-initialised inserted stream and the dimensions it copies:
# rounding in the base's dtype, far below what a wrong norm rule or rotation makes (of the order of one).
FOLLOWING_TOLERANCE = {torch.float32: 1e-3}
HALF_PRECISION_FOLLOWING_TOLERANCE = 5e-2


def check_probe_forward(otter, base) -> None:
    """Raise `LayoutNotDerived` unless `otter` (copy-initialised, holding `base`'s weights) passes the probe."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, base.config.get_text_config().vocab_size, (1, PROBE_TOKENS), generator=generator)
    input_ids = input_ids.to(base.device)
    base_was_training, otter_was_training = base.training, otter.training
    base.eval()
    otter.eval()
    try:
        with torch.no_grad():
            expected = base(input_ids).logits
            try:
                with _recording_copies(otter) as copies, _recording_queries_and_keys(otter) as rotated:
                    output = otter(input_ids, output_hidden_states=True)
            except CapturePointMissed as missed:
                raise LayoutNotDerived(missed.path, "this capture point did not fire on the probe forward") from None
            except LayoutNotDerived:
                raise
            except Exception as error:  # whatever the base's forward raised with the derived layout attached
                raise LayoutNotDerived(
                    "forward", f"the probe forward failed ({type(error).__name__}: {error})"
                ) from None
            if not torch.equal(output.logits, expected):
                raise LayoutNotDerived("logits", "the original logits on the probe forward differ from the base's")
            _check_following(output, len(otter.otter_decoder_layers()))
            for point, (copied, source) in {**rotated, **copies}.items():
                _check_close(
                    copied,
                    source,
                    point,
                    base.dtype,
                    "the copy-initialised inserted copy computes otherwise than its source",
                )
            reproduced = otter.logits_from_hidden(output.hidden_states[-1])
            if not torch.allclose(reproduced, output.logits, rtol=1e-4, atol=1e-5):
                raise LayoutNotDerived(
                    "lm_head", "the base's causal LM changes the LM head's output in a way draft heads do not repeat"
                )
    finally:
        base.train(base_was_training)
        otter.train(otter_was_training)


def _relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.float(), reference.float()
    return ((value - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


def _check_close(value, reference, point: str, dtype: torch.dtype, what: str) -> None:
    difference = _relative_difference(value, reference)
    if not difference <= FOLLOWING_TOLERANCE.get(dtype, HALF_PRECISION_FOLLOWING_TOLERANCE):
        raise LayoutNotDerived(
            point,
            f"{what} (relative difference {difference:.2g}): the derived norm rule, rotation, q/k norms, window, "
            "activation or multipliers do not compute as this base does",
        )


@contextlib.contextmanager
def _recording_copies(otter):
    """Record, per decoder layer, the inserted heads and units beside the original ones they copy: point -> (copied,
    source) pairs, filled by the forward run inside."""
    layout, config = otter.base_model.otter_layout, otter.config
    query_sources, _ = copied_head_sources(config)
    head_dim = otter.otter_decoder_layers()[0].inserted_attn.head_dim
    seen, handles = {}, []

    def record(key, position):
        return lambda module, args: seen.__setitem__(key, args[position])

    for index, layer in enumerate(otter.otter_decoder_layers()):
        for key, module, position in (
            ((index, "original heads"), layer.get_submodule(layout.attention_output), 0),
            ((index, "inserted heads"), layer.inserted_attn.o_proj, 1),
            ((index, "inserted units"), layer.inserted_mlp.down_proj, 1),
        ):
            handles.append(module.register_forward_pre_hook(record(key, position)))
        readout = layout.mlp_readout(layer, config)
        if not readout.reads_output:
            units_module = layer.get_submodule(readout.units_path)
            handles.append(units_module.register_forward_pre_hook(record((index, "original units"), 0)))
    copies = {}
    try:
        yield copies
    finally:
        for handle in handles:
            handle.remove()
    for index in range(len(otter.otter_decoder_layers())):
        inserted, original = seen[index, "inserted heads"], seen[index, "original heads"]
        for head, source in enumerate(query_sources):
            copies[f"layers.{index}.{layout.attention} head {head}"] = (
                inserted[..., head * head_dim : (head + 1) * head_dim],
                original[..., source * head_dim : (source + 1) * head_dim],
            )
        if (index, "original units") in seen:
            units = seen[index, "inserted units"]
            copies[f"layers.{index}.{layout.mlp}"] = (units, seen[index, "original units"][..., : units.shape[-1]])


@contextlib.contextmanager
def _recording_queries_and_keys(otter):
    """Record the queries and keys every attention of the forward run inside hands the attention function (rotated
    and normalised), base and inserted heads alike: point -> (copied, source) pairs, filled after the forward.

    The attention outputs alone would hide a wrong rotation on a small random model, whose attention is nearly
    uniform; the rotated queries and keys differ by the order of one."""
    layout, config = otter.base_model.otter_layout, otter.config
    implementation = config._attn_implementation
    attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, layout.eager_attention_fn)
    seen = {}

    def recording(module, query, key, value, *args, **kwargs):
        seen[id(module)] = (query, key)
        return attention_function(module, query, key, value, *args, **kwargs)

    # transformers' per-instance overrides of the attention functions, restored as they were.
    overrides = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    ALL_ATTENTION_FUNCTIONS[implementation] = recording
    pairs = {}
    try:
        yield pairs
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(overrides)
    query_sources, key_sources = copied_head_sources(config)
    for index, layer in enumerate(otter.otter_decoder_layers()):
        point = f"layers.{index}.{layout.attention}"
        if id(layer.get_submodule(layout.attention)) not in seen:
            raise LayoutNotDerived(point, "the attention does not call transformers' attention function")
        (query, key), (inserted_query, inserted_key) = (
            seen[id(layer.get_submodule(layout.attention))],
            seen[id(layer.inserted_attn)],
        )
        for head, source in enumerate(query_sources):
            pairs[f"{point} query head {head}"] = (inserted_query[:, head], query[:, source])
        for head, source in enumerate(key_sources):
            pairs[f"{point} key head {head}"] = (inserted_key[:, head], key[:, source])


def _check_following(output, num_layers: int) -> None:
    original_states, inserted_states = output.hidden_states, output.inserted_hidden_states
    if original_states is None or inserted_states is None or len(original_states) != len(inserted_states):
        raise LayoutNotDerived("hidden_states", "the base returns no hidden state per layer to compare with")
    for index, (original, inserted) in enumerate(zip(original_states, inserted_states)):
        point = "embed_tokens" if index == 0 else "norm" if index == num_layers else f"layers.{index - 1}"
        _check_close(
            inserted,
            original[..., : inserted.shape[-1]],
            point,
            original.dtype,
            "the copy-initialised inserted stream parts from the dimensions it copies here",
        )
