"""Foundations: volumes, slice views, label sets, settings, prompts, how the networks run."""
