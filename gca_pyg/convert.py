"""``python -m gca_pyg.convert``, by its name; the command lives in :mod:`gca_pyg.app.convert`."""

import sys

from gca_pyg.app.convert import main

if __name__ == "__main__":
    sys.exit(main())
