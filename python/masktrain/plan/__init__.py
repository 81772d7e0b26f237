"""``masktrain plan``: the memory a training run needs, from configs and shapes alone."""
