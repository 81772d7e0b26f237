"""Shared fixtures. Tests never touch the network: the Hub is forced offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
