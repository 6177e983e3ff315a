"""brainsam: LoRA-adapted Segment Anything for deep brain structures in MRI."""
