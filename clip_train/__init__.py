"""clip_train: contrastive image-text pretraining (CLIP) on webdataset shards with Accelerate."""

__version__ = "0.1.0"
