"""The networks: pretrained weights, SAM-family backbones, LoRA and adapter files."""
