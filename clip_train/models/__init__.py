"""Encoder towers, pretrained-weight loading and the CLIP model."""
