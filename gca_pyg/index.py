"""``python -m gca_pyg.index``, by its name; the command lives in :mod:`gca_pyg.app.index`."""

import sys

from gca_pyg.app.index import main

if __name__ == "__main__":
    sys.exit(main())
