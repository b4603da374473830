"""The model configs the benchmarks build, by --model name (standard library only: benchmarks/data.py
imports this in OpenCLIP's venv too)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"demo": REPO / "configs" / "demo.yaml", "tiny": REPO / "configs" / "tiny.yaml"}
# The demo model the published figures were measured with: configs/demo.yaml's, with the
# EfficientNet-Lite0 image tower at 224 px it had until 2026-11-26 (the recipe now uses Lite2 at 260 px
# with Lite0's features appended), and no concatenated tower.
MODEL_OVERRIDES = {
    "demo": [
        "model.image.name=tf_efficientnet_lite0",
        "model.image.pretrained=package:efficientnet-lite0",
        "model.image.image_size=224",
        "model.image.concat=[]",
    ],
    "tiny": [],
}
