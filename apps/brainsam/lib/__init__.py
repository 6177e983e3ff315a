"""Task configurations and inference tasks of the brainsam MONAI Label app."""
