"""``python -m gca_pyg.search``, by its name; the command lives in :mod:`gca_pyg.app.search`."""

import sys

from gca_pyg.app.search import main

if __name__ == "__main__":
    sys.exit(main())
