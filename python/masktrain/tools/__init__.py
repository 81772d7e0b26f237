"""Dataset tools that run without torch (``convert-alpha``)."""
