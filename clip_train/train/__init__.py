"""Train a CLIP model on webdataset shards.

    clip-train configs/tiny.yaml run_dir=runs/tiny data.train_shards=...      # CPU smoke run
    bash launch/quickstart.sh                                                 # the demo recipe
    torchrun --nproc_per_node 2 -m clip_train train configs/tiny.yaml ...     # 2 processes, gloo on CPU
    accelerate launch --config_file launch/accelerate/gpu_8.yaml -m clip_train train configs/demo.yaml ...

From Python: `clip_train.train.main(cfg)`, or `Trainer(cfg, hooks).fit()` to act at each step
(hooks.py). trainer.py holds the loop; the other modules are its parts.
"""

from clip_train.train.finish import format_results
from clip_train.train.hooks import TrainHooks
from clip_train.train.trainer import Trainer, main

__all__ = ["Trainer", "TrainHooks", "format_results", "main"]
