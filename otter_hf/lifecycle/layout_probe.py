"""Whether a derived layout fits a base: one probe forward of a copy-initialised Otter model beside the base.

A layout derived from module names (`otter_hf.modeling.derived_layout`) is only used once the probe shows, on the
base model itself:

- the original logits are bit-identical to the base's (`torch.equal`);
- every capture point fired: the forward completes without `CapturePointMissed`;
- the copy-initialised inserted stream follows the original dimensions it copies, layer after layer, as it does on
  every registered architecture (`tests/test_insert.py`): a norm rule, rotation, multiplier or window the layout
  got wrong shows here as a layer where the two part;
- the LM head's output, processed as the derived causal LM does for draft heads, is the base's logits.

Anything else raises `LayoutNotDerived`, naming where the layout and the base part.
"""

import torch

from ..modeling.derived_layout import LayoutNotDerived
from ..modeling.inserted_stream import CapturePointMissed

PROBE_TOKENS = 8
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
                output = otter(input_ids, output_hidden_states=True)
            except CapturePointMissed as missed:
                raise LayoutNotDerived(missed.path, "this capture point did not fire on the probe forward") from None
            except Exception as error:  # whatever the base's forward raised with the derived layout attached
                raise LayoutNotDerived(
                    "forward", f"the probe forward failed ({type(error).__name__}: {error})"
                ) from None
            if not torch.equal(output.logits, expected):
                raise LayoutNotDerived("logits", "the original logits on the probe forward differ from the base's")
            _check_following(output, len(otter.otter_decoder_layers()), base.dtype)
            reproduced = otter.logits_from_hidden(output.hidden_states[-1])
            if not torch.allclose(reproduced, output.logits, rtol=1e-4, atol=1e-5):
                raise LayoutNotDerived(
                    "lm_head", "the base's causal LM changes the LM head's output in a way draft heads do not repeat"
                )
    finally:
        base.train(base_was_training)
        otter.train(otter_was_training)


def _check_following(output, num_layers: int, dtype: torch.dtype) -> None:
    original_states, inserted_states = output.hidden_states, output.inserted_hidden_states
    if original_states is None or inserted_states is None or len(original_states) != len(inserted_states):
        raise LayoutNotDerived("hidden_states", "the base returns no hidden state per layer to compare with")
    tolerance = FOLLOWING_TOLERANCE.get(dtype, HALF_PRECISION_FOLLOWING_TOLERANCE)
    for index, (original, inserted) in enumerate(zip(original_states, inserted_states)):
        copied = original[..., : inserted.shape[-1]].float()
        difference = (inserted.float() - copied).norm() / copied.norm().clamp_min(torch.finfo(torch.float32).tiny)
        if not difference <= tolerance:
            point = "embed_tokens" if index == 0 else "norm" if index == num_layers else f"layers.{index - 1}"
            raise LayoutNotDerived(
                point,
                f"the copy-initialised inserted stream parts from the dimensions it copies here (relative difference "
                f"{difference.item():.2g}): the derived norm rule, rotation or multipliers do not compute as this base",
            )
