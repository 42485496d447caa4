"""The method: inference-specific learning on one scan (config, bundle and atlases, the scan's mask from
start to end, atlas alignment, per-case fine-tuning, and Refiner.refine composing them)."""
