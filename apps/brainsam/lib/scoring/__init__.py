from .precompute import PrecomputeEmbeddings

__all__ = ["PrecomputeEmbeddings"]
