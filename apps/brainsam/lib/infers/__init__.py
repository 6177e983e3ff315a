from .brainsam import BrainSamInfer

__all__ = ["BrainSamInfer"]
