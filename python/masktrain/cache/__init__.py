"""``masktrain cache``: see ``runner.py`` for the run, ``images.py`` / ``videos.py`` / ``text.py``
for the cachers and ``setup.py`` for what they share."""

from masktrain.cache.runner import run
from masktrain.cache.summary import DatasetSummary

__all__ = ["DatasetSummary", "run"]
