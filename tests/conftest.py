import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def pytest_collection_modifyitems(config, items):
    """Tests that run a Trainer or a subprocess (they ask for ``tmp_path``) are ``slow``: ``-m "not slow"`` runs the
    fast unit tests alone; the README's command runs everything."""
    import inspect

    for item in items:
        function = getattr(item, "function", None)
        if function is not None and "tmp_path" in inspect.signature(function).parameters:
            item.add_marker(pytest.mark.slow)
