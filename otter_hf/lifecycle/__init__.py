"""An Otter model's lifecycle, from a base model to a Hub repository, and where each step lives.

1. Insert: `insert(base, **options)` turns a base causal LM (a model object, a folder or a Hub id) into an Otter
   model with trainable inserted parameters and a frozen base (`insertion.py`).
2. Train: `otter_hf.trainers`.
3. Save: `model.save_pretrained(folder)` writes a full checkpoint with its modeling code; `model.save_otter(folder)`
   the inserted parameters alone, naming their base and its weights' fingerprint. Both are methods of the model
   and write through `otter_hf/modeling/persistence.py` (one save is one unit on disk), because a checkpoint's
   shipped code must save too where otter_hf is not installed.
4. Load: `AutoModelForCausalLM.from_pretrained(folder)` after `import otter_hf` (or with `trust_remote_code=True`
   without it); `load_otter(base, folder)` attaches saved inserted parameters to their base again, refusing a
   base of another architecture, other sizes or other weights (`insertion.py`); `load_model(path)` takes either
   kind of save (`loading.py`).
5. Push: `push_to_hub(model, repo_id)` (also `model.push_to_hub`) uploads the checkpoint, its files and an Otter
   model card in one commit; `otter_only=True` uploads the inserted parameters alone (`hub.py`).
6. Card: `model_cards.otter_model_card` renders the card from `model_cards/otter_model_card.md`.

`output_files.py` writes a command's output folder or file as a unit, as the command line does.
"""

from .hub import push_folder, push_to_hub
from .insertion import insert, load_otter
from .loading import load_model

__all__ = ["insert", "load_model", "load_otter", "push_folder", "push_to_hub"]
