"""``python -m gca_pyg.serve``, by its name; the command lives in :mod:`gca_pyg.app.serve`."""

import sys

from gca_pyg.app.serve import main

if __name__ == "__main__":
    sys.exit(main())
