"""The inserted layer's maths, the very file otter_hf runs in transformers (`otter_hf/modeling/inserted_layer.py`).

It is loaded on its own, without importing the `otter_hf` package: the package's transformers modeling code and
trainers need a newer transformers and packages (TRL) that vLLM's environment does not have, while this one file
imports only torch. Installing otter-hf beside vLLM (`pip install --no-deps otter-hf`) provides it.
"""

import importlib.util
import os
import sys


def _load_inserted_layer():
    package = importlib.util.find_spec("otter_hf")
    if package is None or not package.submodule_search_locations:
        raise ImportError(
            "otter_hf_vllm runs the inserted layer of otter_hf: install otter-hf in vLLM's environment as well "
            "(`pip install --no-deps otter-hf`, or `pip install --no-deps -e .` in a clone)."
        )
    path = os.path.join(package.submodule_search_locations[0], "modeling", "inserted_layer.py")
    spec = importlib.util.spec_from_file_location(f"{__name__}._otter_hf", path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_inserted_layer = _load_inserted_layer()
globals().update({name: getattr(_inserted_layer, name) for name in _inserted_layer.__all__})
__all__ = list(_inserted_layer.__all__)
