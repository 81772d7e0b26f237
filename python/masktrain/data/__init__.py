"""Dataset discovery, buckets, cache format and the cached loader."""
