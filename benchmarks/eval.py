"""Zero-shot classification speed: clip_train's evaluator against OpenCLIP's evaluation path.

    python benchmarks/eval.py                  # demo model, 1,000 Fashion-MNIST test images, 80 templates
    python benchmarks/eval.py --quick          # seconds: tiny model, 40 generated images (used by the tests)
    python benchmarks/eval.py --arch openclip:ViT-B-32 --generate 200 --generate-size 256 \
        --device cuda --precision bf16 --batch-size 256     # what benchmarks/gpu.sh runs

One model (a ClipModel from configs/demo.yaml's model section with its earlier image tower,
pretrained EfficientNet-Lite0 at 224 px, and MiniLM with untrained projections, which does not
matter for speed; `--model tiny` for configs/tiny.yaml; `--arch openclip:ViT-B-32` for one of
OpenCLIP's architectures by name, randomly initialised, as model.arch builds it), the same images
(Fashion-MNIST's test split, an evenly spaced subset of `--limit`), the same eval transform and the
same prompts (`--templates`, default the 80 OpenAI ImageNet templates OpenCLIP users evaluate
with), in one process:

- clip_train cold: `run_evaluation` with one ZeroShotTask (no plots, no output folder) after the
  evaluator's classifier cache has been replaced by an empty one, so the class embeddings are encoded;
- clip_train warm: a second `run_evaluation` of the unchanged model, whose class embeddings come
  from the cache (checked: the cache must count exactly one hit per cold + warm pair, else exit 1);
- open_clip: `open_clip.zero_shot_classifier.build_zero_shot_classifier` (10 classes per text
  batch), then the loop of `open_clip_train/zero_shot.py`'s `run()`, written here because that
  file ships in OpenCLIP's training extra: a DataLoader with `--workers` worker processes,
  inference mode, autocast unless fp32, logits = 100 x normalised image features @ classifier,
  top-1/top-5 counts. Timed: classifier build + loop, like clip_train's cold figure (which also
  opens the dataset and reads the templates, a few milliseconds).

Each side first makes one untimed pass over a few images with one template, so that one-off
costs (allocator growth, lazy imports, the first forward's kernel choice) land in no figure.
Then `--repeats` rounds each run all three, alternating which side goes first so that a change in
the machine's other load hits both; reported are the median seconds, images/s = N / seconds and
the ratio clip_train / OpenCLIP, cold and warm. Both sides must reach the same top-1 (within
1e-6): the protocol is the same, so a difference is a bug, and the run exits 1 without writing.

Where the time goes: the timed runs themselves are split with perf_counter, by wrapping (in this
script, not in the package) the classifier cache's `get` (text encoding: classes x templates
prompts through the text tower), the model's `encode_image` (image forward) and, on the
clip_train side, the eval transform; "rest" is the run's seconds minus text and forward: image
decode + transform, opening the dataset, metrics, and on OpenCLIP's side the wait for its loader
workers. The table shows the parts of the median run.

OpenCLIP at batch 8 (open_clip_small_batch): OpenCLIP's loop given DataLoader batches of the
size clip_train's evaluator encodes at once (eval.image_chunk, auto: 8 on CPU), to show how much of
the ratio that chunking explains; OpenCLIP evaluates with its training --batch-size, so its users
get it only by training with that batch.

Measured (2-core Xeon, fp32, batch 64, 1,000 Fashion-MNIST images, 80 templates, 2026-11-26;
docs/benchmarks.md has the table): OpenCLIP 36.2 images/s, clip_train 76.5 cold (2.11x) and 82.0 warm (2.27x),
OpenCLIP at batch 8 63.2; the same top-1 on all sides. The image forward is ~95% of OpenCLIP's time;
clip_train's image forward takes 11.2 s against OpenCLIP's 26.1 s at batch 64 and 14.2 s at batch 8
(the traced, frozen tower: BatchNorm folded, oneDNN kernels; eval.jit_image_tower). --quick figures
(40 tiny images) are dominated by fixed costs and by other jobs on the machine, and say nothing
about speed.

--generate K: instead of --dataset, an ImageFolder of 10 classes x K generated pictures (coloured
shapes, as --quick's) of --generate-size px saved as JPEG (quality 90), made once per run.
--top1-tolerance: the largest top-1 difference between the sides that is not an error; the default
1e-6 is for fp32, where both sides compute the same numbers. Under bf16 on a GPU the sides encode
the prompts in batches of different sizes (clip_train: --batch-size prompts, OpenCLIP: 10 classes'
templates), which moves the embeddings in the last bits, and a randomly initialised model's class
scores are close enough for that to flip a few predictions.

Writes the table to stdout and everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import torch
from bench_models import CONFIGS, MODEL_OVERRIDES  # benchmarks/ is on sys.path
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image, ImageDraw

from clip_train.config import ConfigError, EvalConfig, ZeroShotTask, load_config
from clip_train.evaluate import encode, runner
from clip_train.evaluate.datasets import DatasetError, load_dataset
from clip_train.evaluate.prompts import load_templates
from clip_train.models.arch import arch_model_config
from clip_train.models.clip import ClipModel
from clip_train.models.tokenizer import build_tokenizer
from clip_train.models.transforms import build_image_transforms

REPO = Path(__file__).resolve().parents[1]

SIDES = ("clip_train_cold", "clip_train_warm", "open_clip", "open_clip_small_batch")
WARMUP_IMAGES = 8
TOP1_TOLERANCE = 1e-6
TARGET_RATIO = 1.5  # the target for clip_train / OpenCLIP images/s
ZERO_SHOT_LOGIT_SCALE = 100.0  # OpenCLIP's fixed zero-shot logit scale
# --quick: an ImageFolder of generated pictures, which exists on any machine (the Debian
# Fashion-MNIST package may not be installed)
QUICK_COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20),
    "purple": (140, 40, 170),
}  # fmt: skip
QUICK_SHAPES = ("circle", "square")
QUICK_PER_CLASS = 4  # 5 colours x 2 shapes = 10 classes (so top-5 exists), 40 images


# ---- setup -------------------------------------------------------------------------------------


def build_model(name: str, device: torch.device, arch: str = ""):
    # run_dir and train_shards are required by the run schema but unused here
    if arch:  # the named architecture replaces both towers: the tiny config is only the rest of a run
        name, extra = "tiny", [f"model.arch={arch}"]
    else:
        extra = []
    overrides = ["run_dir=/tmp/x", "data.train_shards=/tmp/x"] + MODEL_OVERRIDES[name] + extra
    cfg = load_config([CONFIGS[name]], overrides)
    if cfg.model.arch:  # as clip-train resolves it at start-up: the named architecture's towers
        cfg.model = arch_model_config(cfg.model)
    torch.manual_seed(0)  # the untrained projections (and the tiny model): the same top-1 every run
    model = ClipModel(cfg.model).to(device).eval()
    tokenizer = build_tokenizer(cfg.model.text)
    transform = build_image_transforms(model.visual, cfg.model.image)[1]
    return model, tokenizer, transform


def write_quick_images(root: Path, per_class: int = QUICK_PER_CLASS, size: int = 48, ext="png") -> Path:
    """A one-sub-folder-per-class ImageFolder of coloured shapes at varied positions."""
    folder = root / "shapes"
    rng = np.random.default_rng(0)
    unit = size / 48  # the shapes' layout, drawn at 48 px for --quick, scaled
    for colour, fill in QUICK_COLOURS.items():
        for shape in QUICK_SHAPES:
            (folder / f"{colour}_{shape}").mkdir(parents=True)
            for j in range(per_class):
                img = Image.new("RGB", (size, size), "white")
                x, y = (int(v * unit) for v in rng.integers(0, 12, size=2))
                draw = ImageDraw.Draw(img)
                paint = draw.ellipse if shape == "circle" else draw.rectangle
                low, high = int(4 * unit), int(30 * unit)
                paint([low + x, low + y, high + x, high + y], fill=fill)
                img.save(folder / f"{colour}_{shape}" / f"{j}.{ext}", quality=90)
    return folder


# ---- timing of the pieces ----------------------------------------------------------------------


class Clock:
    """Seconds spent in named pieces of one timed run, collected by wrappers around callables."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, name: str, start: float) -> None:
        if self.device.type == "cuda":  # kernels are asynchronous: wait for them before reading
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.add(name, start)
            return out

        return timed

    def take(self) -> dict[str, float]:
        """The pieces so far, and start over for the next run."""
        taken = dict(self.seconds)
        self.seconds.clear()
        return taken


class TimedClassifierCache(encode.ClassifierCache):
    """The evaluator's cache, timing its lookups: a miss encodes all prompts, a hit costs ~nothing."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock = clock

    def get(self, *args, **kwargs):
        start = time.perf_counter()
        weights = super().get(*args, **kwargs)
        self.clock.add("text_s", start)
        return weights


class TimedTransform:
    def __init__(self, transform, clock: Clock):
        self.transform = transform
        self.clock = clock

    def __call__(self, image):
        start = time.perf_counter()
        out = self.transform(image)
        self.clock.seconds["transform_s"] += time.perf_counter() - start  # CPU work: no sync needed
        return out


# ---- clip_train --------------------------------------------------------------------------------


def fresh_classifier_cache(clock: Clock) -> TimedClassifierCache:
    """Replace the evaluator's classifier cache with an empty one and return it.

    The zero-shot classifier looks the cache up on the encode module; the caller checks on the
    returned object that the warm evaluation was served from it.
    """
    cache = TimedClassifierCache(clock)
    encode.CLASSIFIER_CACHE = cache
    return cache


def clip_train_eval(model, tokenizer, transform, task: ZeroShotTask, args, device) -> tuple[float, dict]:
    """(seconds, {"acc1", "acc5"}) of one run_evaluation holding this single zero-shot task."""
    cfg = EvalConfig(zeroshot=[task], retrieval=False, batch_size=args.batch_size, plots=False)
    start = time.perf_counter()
    flat = runner.run_evaluation(model, tokenizer, transform, cfg, "", device, args.precision, out_dir=None)
    seconds = time.perf_counter() - start
    # keys are "<dataset name>/acc1", and in --quick mode the name is a temporary folder's
    return seconds, {k.rsplit("/", 1)[1]: v for k, v in flat.items() if k.endswith(("/acc1", "/acc5"))}


# ---- OpenCLIP ----------------------------------------------------------------------------------


class TransformedImages(torch.utils.data.Dataset):
    """The labelled images as a map-style dataset of (tensor, label), as ImageFolder gives them."""

    def __init__(self, data, transform):
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.transform(self.data.image(index)), self.data.labels[index]


def _fill(template: str, classname: str) -> str:
    return template.format(c=classname)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def open_clip_eval(
    model, tokenizer, transform, data, templates, args, device, batch_size: int | None = None
) -> tuple[float, dict]:
    """(seconds, {"acc1", "acc5", "text_s", "loop_s"}) of OpenCLIP's zero-shot evaluation, with
    DataLoader batches of batch_size (default --batch-size)."""
    # OpenCLIP fills str templates positionally ("{}"); ours name the slot {c}, so they go in as
    # callables, the form of OpenCLIP's own template lists.
    as_callables = [partial(_fill, t) for t in templates]
    # made outside the clock, as open_clip_train builds its loaders once at start-up; iterating it
    # (which starts the workers) is inside
    loader = torch.utils.data.DataLoader(
        TransformedImages(data, transform), batch_size=batch_size or args.batch_size, num_workers=args.workers
    )
    start = time.perf_counter()
    with _autocast(args.precision, device):
        classifier = build_zero_shot_classifier(
            model, tokenizer, data.classnames, as_callables, num_classes_per_batch=10, device=device
        )
    built = time.perf_counter()
    top1 = top5 = n = 0
    with torch.inference_mode():
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            with _autocast(args.precision, device):
                features = model.encode_image(images)  # L2-normalised
                logits = ZERO_SHOT_LOGIT_SCALE * features @ classifier
            correct = logits.topk(min(5, logits.shape[1]), dim=1).indices == target[:, None]
            top1 += int(correct[:, 0].sum())
            top5 += int(correct.any(dim=1).sum())
            n += images.shape[0]
    end = time.perf_counter()
    info = {"acc1": top1 / n, "text_s": built - start, "loop_s": end - built}
    if len(data.classnames) > 5:  # as clip_train reports it: top-5 only with more than 5 classes
        info["acc5"] = top5 / n
    return end - start, info


# ---- report ------------------------------------------------------------------------------------


def summarise(runs: dict[str, list[tuple[float, dict]]], n: int) -> dict:
    """Per side: median seconds and images/s, every run's seconds, and the median run's details."""
    sides = {}
    for side, results in runs.items():
        seconds = [s for s, _ in results]
        middle = seconds.index(statistics.median_low(seconds))
        median = statistics.median(seconds)
        info = results[middle][1]
        parts = {k: v for k, v in info.items() if not k.startswith("acc")}
        rest = seconds[middle] - parts.get("text_s", 0.0) - parts.get("forward_s", 0.0)
        sides[side] = {
            "seconds": median,
            "images_per_s": n / median,
            "all_seconds": seconds,
            **{k: v for k, v in info.items() if k.startswith("acc")},
            "median_run": {"seconds": seconds[middle], **parts, "rest_s": rest},
        }
    return sides


def format_table(sides: dict, ratio: dict) -> str:
    base = sides["open_clip"]["images_per_s"]
    lines = [
        f"{'side':<21}  {'seconds':>8}  {'images/s':>9}  {'top-1':>7}  {'top-5':>7}  {'vs OpenCLIP':>11}"
        f"  | median run: {'text s':>7}  {'image fwd s':>11}  {'rest s':>7}"
    ]
    for side in SIDES:
        r, m = sides[side], sides[side]["median_run"]
        acc5 = f"{r['acc5']:.4f}" if "acc5" in r else "-"
        lines.append(
            f"{side:<21}  {r['seconds']:>8.3f}  {r['images_per_s']:>9.1f}  {r['acc1']:>7.4f}  {acc5:>7}  "
            f"{r['images_per_s'] / base:>10.2f}x  | {'':>12}{m.get('text_s', 0.0):>7.3f}  "
            f"{m.get('forward_s', 0.0):>11.3f}  {m['rest_s']:>7.3f}"
        )
    cold = sides["clip_train_cold"]["median_run"]
    small = sides["clip_train_cold"]["images_per_s"] / sides["open_clip_small_batch"]["images_per_s"]
    lines.append(
        f"ratio clip_train / OpenCLIP: cold {ratio['cold']:.2f}x, warm {ratio['warm']:.2f}x "
        f"(target {TARGET_RATIO}x); against OpenCLIP with batches of clip_train's image chunk: "
        f"cold {small:.2f}x"
    )
    lines.append(
        "text = classifier build; rest = image decode + transform, dataset, metrics (OpenCLIP: the "
        f"wait for its loader workers); clip_train cold's transform alone: {cold.get('transform_s', 0):.3f} s"
    )
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="demo")
    parser.add_argument("--arch", default="", help="model.arch, e.g. openclip:ViT-B-32 (replaces the towers)")
    parser.add_argument("--generate", type=int, default=0, help="K: evaluate on 10 x K generated pictures")
    parser.add_argument("--generate-size", type=int, default=224, help="their side in pixels")
    parser.add_argument("--top1-tolerance", type=float, default=TOP1_TOLERANCE, help="see the docstring")
    parser.add_argument("--dataset", default="fashion-mnist", help="a clip-eval zero-shot dataset or folder")
    parser.add_argument("--limit", type=int, default=1000, help="N evenly spaced images")
    parser.add_argument("--templates", default="openai_imagenet", help="a shipped template set or a file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="the OpenCLIP side's DataLoader workers")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default 3, or 1 with --quick")
    parser.add_argument("--quick", action="store_true", help="tiny model, 40 generated images: a smoke run")
    parser.add_argument("--out", default="benchmarks/results/eval.json")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if min(args.repeats, args.limit, args.batch_size) < 1 or args.workers < 0:
        parser.error("--repeats, --limit and --batch-size must be at least 1, --workers at least 0")
    if args.generate < 0 or args.generate_size < 16 or args.top1_tolerance < 0:
        parser.error("--generate must be at least 0, --generate-size at least 16, --top1-tolerance >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.model, args.dataset = "tiny", str(write_quick_images(Path(tmp)))
            args.limit = len(QUICK_COLOURS) * len(QUICK_SHAPES) * QUICK_PER_CLASS
        elif args.generate:
            args.dataset = str(write_quick_images(Path(tmp), args.generate, args.generate_size, "jpg"))
            args.limit = len(QUICK_COLOURS) * len(QUICK_SHAPES) * args.generate
        try:
            data = load_dataset(args.dataset, args.limit)
            templates = load_templates(args.templates, data.name)
        except (DatasetError, ValueError) as e:
            print(f"eval.py: error: {e}", file=sys.stderr)
            return 2
        n = len(data)
        try:
            model, tokenizer, transform = build_model(args.model, device, args.arch)
        except ConfigError as e:
            print(f"eval.py: error: {e}", file=sys.stderr)
            return 2
        clock = Clock(device)
        # Every timed run goes through these wrappers; each adds two clock reads per call (a batch
        # for the forward), far below the resolution of the figures.
        model.encode_image = clock.wrap("forward_s", model.encode_image)  # OpenCLIP's side
        # clip_train's evaluator runs the (traced) tower through encode.in_chunks, not encode_image
        encode.in_chunks = clock.wrap("forward_s", encode.in_chunks)
        timed_transform = TimedTransform(transform, clock)
        task = ZeroShotTask(dataset=args.dataset, limit=args.limit, template_set=args.templates)
        print(
            f"{args.model} model, {data.name}: {n} images, {len(data.classnames)} classes, "
            f"{len(templates)} templates ({args.templates}), batch {args.batch_size}, {args.precision}, "
            f"{device}, {torch.get_num_threads()} threads, {args.repeats} repeat(s)",
            flush=True,
        )

        # Untimed warm-up of both code paths: a few images, one template.
        fresh_classifier_cache(clock)
        warm_task = ZeroShotTask(dataset=args.dataset, limit=WARMUP_IMAGES, templates=templates[:1])
        clip_train_eval(model, tokenizer, timed_transform, warm_task, args, device)
        few = load_dataset(args.dataset, WARMUP_IMAGES)
        open_clip_eval(model, tokenizer, transform, few, templates[:1], args, device)
        clock.take()

        # OpenCLIP evaluates with its training --batch-size; clip_train's evaluator encodes images in
        # chunks of eval.image_chunk (auto: 8 on CPU) whatever the batch. This side gives OpenCLIP
        # batches of that chunk size: how much of the ratio the chunking alone explains.
        small_batch = min(args.batch_size, encode.image_chunk_size(device))
        runs: dict[str, list[tuple[float, dict]]] = {side: [] for side in SIDES}
        for repeat in range(args.repeats):
            order = ("clip_train", "open_clip") if repeat % 2 == 0 else ("open_clip", "clip_train")
            for side in order:
                if side == "open_clip":
                    for label, batch in (("open_clip", None), ("open_clip_small_batch", small_batch)):
                        seconds, info = open_clip_eval(
                            model, tokenizer, transform, data, templates, args, device, batch
                        )
                        # the classifier build's own split is exact; forward_s comes from the wrapper
                        runs[label].append((seconds, {**info, "forward_s": clock.take()["forward_s"]}))
                        print(f"  repeat {repeat + 1}: {label} {seconds:.3f} s", flush=True)
                    continue
                cache = fresh_classifier_cache(clock)
                for label in ("clip_train_cold", "clip_train_warm"):
                    seconds, acc = clip_train_eval(model, tokenizer, timed_transform, task, args, device)
                    runs[label].append((seconds, {**acc, **clock.take()}))
                    print(f"  repeat {repeat + 1}: {label} {seconds:.3f} s", flush=True)
                if cache.hits != 1:  # cold must miss and warm hit, or the two labels would be wrong
                    print(
                        f"eval.py: error: the classifier cache was hit {cache.hits} times in a cold + warm "
                        "pair (expected 1): the warm figure would not measure a cached classifier",
                        file=sys.stderr,
                    )
                    return 1

    sides = summarise(runs, n)
    base = sides["open_clip"]["images_per_s"]
    ratio = {side.rsplit("_", 1)[1]: sides[side]["images_per_s"] / base for side in SIDES[:2]}
    print()
    print(format_table(sides, ratio))
    if any(abs(sides[side]["acc1"] - sides["open_clip"]["acc1"]) > args.top1_tolerance for side in SIDES):
        print(
            "eval.py: error: top-1 differs between the sides ("
            + ", ".join(f"{side} {sides[side]['acc1']:.6f}" for side in SIDES)
            + "); the protocol is the same on both, so this is a bug; no results written",
            file=sys.stderr,
        )
        return 1

    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # the machine may be shared: how busy it was
        "device": device.type,
        "precision": args.precision,
        "model": args.model,
        "arch": args.arch,
        "top1_tolerance": args.top1_tolerance,
        "top1_max_diff": max(abs(s["acc1"] - sides["open_clip"]["acc1"]) for s in sides.values()),
        "dataset": "generated shapes (--quick)" if args.quick else args.dataset,
        "generated": {"per_class": args.generate, "size": args.generate_size} if args.generate else None,
        "num_images": n,
        "num_classes": len(data.classnames),
        "templates": args.templates,
        "num_templates": len(templates),
        "batch_size": args.batch_size,
        "open_clip_workers": args.workers,
        "open_clip_small_batch": small_batch,
        "clip_train_image_chunk": encode.image_chunk_size(device),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "sides": sides, "ratio": ratio, "target_ratio": TARGET_RATIO}
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
