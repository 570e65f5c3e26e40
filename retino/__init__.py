"""Retino: train, compare and explain diabetic-retinopathy grading models."""
__version__ = "0.1.0"
