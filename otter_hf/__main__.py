"""`python -m otter_hf`: the `otter-hf` command line."""

import sys

from .cli import main

sys.exit(main())
