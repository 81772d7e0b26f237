"""Samples of what the LoRA does: images and videos from a prompt file, during training
(``--sample_prompts`` with ``--sample_every_n_steps`` / ``--sample_every_n_epochs`` /
``--sample_at_first``) and after it (``masktrain sample``).

- ``config.sample_prompts``: musubi-tuner's prompt file (text with inline ``--w --h --f --d --s --l
  --fs --n``, or its TOML / JSON forms), read torch-free when the flags are checked;
- ``sampler.py``: encodes the prompts once (the text encoder is then freed), keeps the VAE in host
  memory, and generates through the family's diffusers pipeline with the training transformer and
  its adapters (``ModelFamily.generate``);
- ``outputs.py``: the PNG / MP4 files and the contact sheet;
- ``run.py``: ``masktrain sample``, a saved LoRA's samples.
"""
