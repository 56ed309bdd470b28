"""``python -m gca_pyg.report``, by its name; the command lives in :mod:`gca_pyg.app.report`."""

import sys

from gca_pyg.app.report import main

if __name__ == "__main__":
    sys.exit(main())
