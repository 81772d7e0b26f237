"""Model families behind one small Protocol (``base.ModelFamily``) and a registry."""

from masktrain.models.registry import ARCHES, get_family

__all__ = ["ARCHES", "get_family"]
