"""otter_hf's torch-only files, the very ones otter_hf runs in transformers, loaded on their own.

The `otter_hf` package's transformers modeling code and trainers need a newer transformers and packages (TRL)
that vLLM's environment does not have, so the plugin never imports the package: it loads by path the files of
`otter_hf/modeling/` that import only torch (the inserted layer's maths, the guidance weight's bound). Installing
otter-hf beside vLLM (`pip install --no-deps otter-hf`) provides them.
"""

import importlib.util
import os
import sys
from types import ModuleType


def load_otter_hf_file(name: str) -> ModuleType:
    """`otter_hf/modeling/<name>.py`, run as a module of this package (once; later calls return it)."""
    module_name = f"{__package__}._otter_hf_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    package = importlib.util.find_spec("otter_hf")
    if package is None or not package.submodule_search_locations:
        raise ImportError(
            "otter_hf_vllm runs files of otter_hf: install otter-hf in vLLM's environment as well "
            "(`pip install --no-deps otter-hf`, or `pip install --no-deps -e .` in a clone)."
        )
    path = os.path.join(package.submodule_search_locations[0], "modeling", f"{name}.py")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up by name.
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
