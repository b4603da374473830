"""Contrastive losses: where image-text logits are formed, and the only place.

contrastive.py  ContrastiveLoss: InfoNCE or SigLIP, dense / local / tiled, across processes
blockwise.py    the tiled kernels: exact losses computed block by block, memory O(N d + block^2)
reference.py    brute-force float64 versions, the ground truth for tests and benchmarks
"""
