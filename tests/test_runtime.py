import sys

import pytest

from gca_pyg.runtime import retain_freed_memory


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("GCA_PYG_MALLOC", "system")
    assert retain_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_accepts_the_settings(monkeypatch):
    monkeypatch.delenv("GCA_PYG_MALLOC", raising=False)
    assert retain_freed_memory() is True
