"""``python -m lwcompile ...``: the same command line as the ``lwcompile`` script (see :mod:`lwcompile.cli`)."""
import sys

from lwcompile.cli import main

if __name__ == "__main__":
    sys.exit(main())
