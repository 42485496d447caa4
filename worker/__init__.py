"""Composes segmentation and registration into the inference-specific learning pipeline, plus the CLI."""
