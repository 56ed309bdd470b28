"""User-facing errors and warnings.

Every error a person can fix themselves (a missing dataset, a wrong folder, a bad config value, an
unavailable download) is a :class:`GcaError` whose message is one line: what was wrong, where, and
what to do. The command-line entry points print that line and exit non-zero without a traceback;
library users catch the subclass they care about (:func:`exit_status` is that rule for a command).
:func:`warn` prints a one-line warning the same way.
"""

import sys
from typing import Any, Callable


def exit_status(command: Callable[[], Any]) -> int:
    """Runs a command's body: 0 when it returns, 2 with its one-line message on standard error when
    it raises a :class:`GcaError`."""
    try:
        command()
    except GcaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def warn(message: str):
    """Prints ``warning: message`` to standard error: something the user should know that does not
    stop the command."""
    print(f"warning: {message}", file=sys.stderr)


class GcaError(Exception):
    """Base class of errors whose message tells the user what to do."""


class ConfigError(GcaError, ValueError):
    """A configuration key, value or type is invalid."""


class DatasetNotFoundError(GcaError, FileNotFoundError):
    """A dataset root does not exist or holds none of the expected files."""


class DatasetLayoutError(GcaError, ValueError):
    """A dataset exists but its layout or counts differ from the official archive."""


class UnreadableImagesError(GcaError, RuntimeError):
    """Too many images of a dataset could not be decoded."""


class WeightsUnavailableError(GcaError, RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


class NonFiniteLossError(GcaError, FloatingPointError):
    """A training loss became NaN or infinite; the update was not applied."""


class MissingExtraError(GcaError, ImportError):
    """A feature needs an optional extra (``pip install "gca-pyg[EXTRA]"``) that is missing."""
