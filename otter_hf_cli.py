"""The `otter-hf` entry point, outside the `otter_hf` package so that it runs before the package's imports.

Importing otter_hf imports torch and transformers, which takes seconds; Ctrl-C in that time ends, as it does once
the command runs, with one line and status 130 instead of an import traceback.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from otter_hf.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("otter-hf: interrupted\n")
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
