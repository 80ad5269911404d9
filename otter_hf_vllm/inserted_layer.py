"""The inserted layer's maths, the very file otter_hf runs in transformers (`otter_hf/modeling/inserted_layer.py`),
loaded without importing the `otter_hf` package (`otter_hf_files`)."""

from .otter_hf_files import load_otter_hf_file

_inserted_layer = load_otter_hf_file("inserted_layer")
globals().update({name: getattr(_inserted_layer, name) for name in _inserted_layer.__all__})
__all__ = list(_inserted_layer.__all__)
