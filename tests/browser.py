"""The headless Chromium of the browser tests: where it is, and the flags that keep it to itself
(no network of its own, no first-run work, a throwaway profile)."""

import shutil

CHROMIUM = next(
    (
        shutil.which(name)
        for name in ("chromium", "chromium-browser", "google-chrome")
        if shutil.which(name)
    ),
    None,
)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SKIP_REASON = "no chromium on this machine: apt-get install chromium (Debian) to run browser tests"
