from .brainsam import BrainSamTrain

__all__ = ["BrainSamTrain"]
