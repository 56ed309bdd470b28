"""``python -m gca_pyg.train``, by its name; the command lives in :mod:`gca_pyg.app.train`."""

import sys

from gca_pyg.app.train import main

if __name__ == "__main__":
    sys.exit(main())
