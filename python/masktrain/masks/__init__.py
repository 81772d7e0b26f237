"""``masktrain masks``: making the masks the loss reads. ``apply_instance`` keeps only the subject
of a group photo in its tiered mask (the guide's "Group Photos" step)."""
