"""The model being trained, as ``train``, ``sample``, the tools, the demo and the benches all use
it: the transformer(s) with their LoRA and where their weights live (``experts``), the adapter on
a live model through peft (``lora``), the LoRA file in its three layouts (``lora_file``) and the
conversion between them (``lora_convert``). Nothing here knows about a training run."""
