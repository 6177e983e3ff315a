from .brainsam import BrainSam

__all__ = ["BrainSam"]
