"""Answering prompts: the segmenter, the predictor, caches and the engine facade."""
