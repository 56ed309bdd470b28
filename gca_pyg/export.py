"""``python -m gca_pyg.export``, by its name; the command lives in :mod:`gca_pyg.app.export`."""

import sys

from gca_pyg.app.export import main

if __name__ == "__main__":
    sys.exit(main())
