"""`masktrain train`: LoRA training with the weighted mask loss and masked prior preservation."""
