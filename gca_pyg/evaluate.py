"""``python -m gca_pyg.evaluate``, by its name; the command lives in :mod:`gca_pyg.app.evaluate`."""

import sys

from gca_pyg.app.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
