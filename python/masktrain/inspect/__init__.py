"""``masktrain inspect``: what the loss will see, before training. ``report`` measures every item
(from the cache where it is fresh, else from the images and masks), ``page`` writes the overlays,
``inspect/index.html`` and ``inspect/summary.json``."""
