"""`isl train`: a model bundle (segmentation and registration networks, atlases, model card) from a labelled
dataset."""
