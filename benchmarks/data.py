"""Training input pipeline speed: clip_train's webdataset loader against OpenCLIP's, on the same shards.

    python benchmarks/data.py            # real OpenClipart drawings stored as 1024 px JPEGs, 224 px out
    python benchmarks/data.py --quick    # seconds: synthetic 1024 px JPEGs, tiny model (used by the tests)

The whole input pipeline of a training step is timed: read the tar, shuffle, decode the JPEG,
transform to a normalised [3, 224, 224] tensor, tokenize the caption, batch (64), with 2 DataLoader
worker processes and resampled shards, which is how both trainers run by default.

Shards: OpenClipart PNGs (Debian openclipart-png) whose longer side is at least --min-side (1024)
pixels, written by the project's own writer (clip_train.data.shards.write_shards: composited on
white, shrunk to a longer side of 1024, JPEG quality 90), all in the train split. They are built
once into $CLIP_TRAIN_CACHE/bench_shards_1024 (default ~/.cache/clip_train) and reused. Only
about 830 of the 3,518 drawings are that large; the smaller ones are left out rather than stored
small, because what is measured is the cost of a 1024 px JPEG on its way to 224 px (a 400 px
image would make both sides look faster and hide exactly the decode the draft mode saves).

Sides, each measured in a fresh process so that no side inherits another's warm state:

- openclip: `open_clip_train.data.get_wds_dataset` from OpenCLIP's trainer with the Namespace its
  own CLI gives (`open_clip_train.params.parse_args` on --train-data, --train-num-samples,
  --dataset-type webdataset, --dataset-resampled, --batch-size, --workers, --seed, then world_size
  1 / rank 0 as its init_distributed_device sets them on one process); preprocessing
  `open_clip.transform.image_transform(224, is_train=True, mean, std)` (RandomResizedCrop scale
  0.9-1, bicubic) and `open_clip.tokenizer.HFTokenizer` on clip_train's own tokenizer files, so
  the token ids are the same. It needs webdataset 0.2.86, so it runs in the venv that
  benchmarks/openclip_venv.sh sets up (created on first use of the full mode).
- clip_train_draft_off / clip_train_draft_on: `clip_train.data.pipeline.build_train_loader` with
  the model's training transform (`build_image_transforms(..., uint8=True)` of configs/demo.yaml's
  model: timm's RandomResizedCrop scale 0.9-1, bicubic, ending at uint8 images as in training,
  where the step normalises the batch; with --transform eval, normalised floats) and tokenizer, without
  and with JPEG draft-mode decoding (reduced-scale DCT decode before the resize). The switch is
  found with inspect.signature: `draft_decode=False/True`, or `decode_size=None/<image size>`
  (what train.py passes for data.fast_decode); with neither argument there is one clip_train row,
  without it, and the table says so.

Protocol per measurement: build the loader, pull --warmup batches (worker start-up, shuffle
buffer fill, first-call costs), then time --batches batches; images/s = batches x batch size /
seconds. Both counts are rounded up to multiples of the worker count: workers deliver batches in
turn, so a window that starts and ends on a full round measures every worker the same number of
times. --repeats rounds run every side once, in an order rotated each round so that a change in
the machine's other load hits all sides; the table shows the median images/s. Next to it, the
CPU time the pipeline used over the same window per image (the child process and its loader
workers, from getrusage and /proc/<pid>/stat): on a shared machine another job's load moves
images/s a lot (runs of one side have differed by 2x here) but the CPU work an image costs much
less, so the CPU ratio is the steadier comparison; with both cores free, images/s would approach
2000 / CPU ms. Each run records the 1-minute load average as it started. The batch shapes and
dtypes, and the token ids of a probe caption, must be the same on every side (else exit 1, no
results written): a faster pipeline that returned something else would not be a comparison.

Measured (2-core CPU shared with other jobs, 1-min load 2.1-5.1; benchmarks/results/data.json):
829 drawings, all stored at 1024 px (originals' median 1123 px, JPEG median 36 KiB: flat clip art
decodes faster than photos would). CPU per image: OpenCLIP 12.7 ms, clip_train draft off 10.7
(1.19x less), draft on 6.3 (2.02x less). Wall clock, medians of 3: OpenCLIP 55.5 images/s,
clip_train 94.4 (1.70x) and 139.2 (2.51x), but single runs of one side ranged 104-251 images/s
with the load, so re-run on a quiet machine before quoting the wall-clock ratios. Output shapes
are the same on all sides: images [64, 3, 224, 224] float32, tokens [64, 32] int64.

Writes the table to stdout and everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench_models import CONFIGS, MODEL_OVERRIDES  # benchmarks/ is on sys.path

# Only the standard library at module level: the OpenCLIP child runs this file in its own venv,
# where clip_train's pipeline (webdataset 1.x) must not be imported.

REPO = Path(__file__).resolve().parents[1]

SIDES = ("openclip", "clip_train_draft_off", "clip_train_draft_on")
TARGET_RATIO = 1.5  # the target for clip_train / OpenCLIP images/s
SHARDS_NAME = "bench_shards_1024"
STORED_SIZE = 1024  # longer side of the stored JPEGs
PROBE_CAPTION = "A red  apple on a wooden table. fruit, food, still life"  # tokenized on every side
CHILD_TIMEOUT_S = 900
QUICK_SAMPLES = 24


def cache_dir() -> Path:
    return Path(os.environ.get("CLIP_TRAIN_CACHE", "~/.cache/clip_train")).expanduser()


def venv_python() -> Path:
    # the same location benchmarks/openclip_venv.sh uses
    return Path(os.environ.get("OPENCLIP_VENV", cache_dir() / "venv-openclip")) / "bin" / "python"


# ---- shards ------------------------------------------------------------------------------------


def large_openclipart(min_side: int, limit: int | None):
    """OpenClipart records (the demo source, captions included) whose PNG is >= min_side on its
    longer side, read from the PNG header only; the writer later skips what it cannot use."""
    from clip_train.data.shards import DEFAULT_MAX_PIXELS, ImageTooLarge, open_image
    from clip_train.demo.sources import openclipart_records

    taken = 0
    for record in openclipart_records():
        try:
            with open_image(record.image, DEFAULT_MAX_PIXELS) as img:
                side = max(img.size)
        except (ImageTooLarge, OSError, ValueError):
            continue  # the writer would skip these too (too_large / unreadable)
        if side >= min_side:
            yield record
            taken += 1
            if limit is not None and taken >= limit:
                return


def synthetic_records(n: int, size: int):
    """Valid 1024 px JPEGs that exist on any machine: smooth random colour fields plus noise
    (pure noise would make an unrealistically slow entropy decode), with short captions."""
    import numpy as np
    from PIL import Image

    from clip_train.data.sources import Record

    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "circle", "square", "house", "tree", "cat", "dog", "car", "boat"]
    for i in range(n):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size * 3 // 4), Image.Resampling.BICUBIC)
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(size * 3 // 4, size, 3))
        out = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
        caption = "a synthetic picture of a " + " ".join(rng.choice(words, size=3))
        yield Record("synthetic", f"synthetic/{i:04d}", out.getvalue(), caption, {"category": "", "path": ""})


def build_shards(folder: Path, records, recipe: dict, *, shard_size: int, num_procs: int) -> dict:
    """The project's writer, everything in the train split. A finished build (stats.json) made from
    the same `recipe` (written beside it as bench.json) is reused; one from another is replaced."""
    stats_file, recipe_file = folder / "stats.json", folder / "bench.json"
    recipe = {**recipe, "max_size": STORED_SIZE, "shard_size": shard_size}
    if stats_file.exists() and recipe_file.exists() and json.loads(recipe_file.read_text()) == recipe:
        return json.loads(stats_file.read_text())
    from clip_train.data.shards import write_shards

    print(f"building the benchmark shards in {folder} (once)", flush=True)
    stats = write_shards(
        records,
        folder,
        max_size=STORED_SIZE,
        val_frac=0.0,
        shard_size=shard_size,
        num_procs=num_procs,
        overwrite=stats_file.exists(),  # only ever a folder this function built (it has stats.json)
    )
    recipe_file.write_text(json.dumps(recipe) + "\n")
    return stats


def shard_summary(folder: Path, stats: dict) -> dict:
    """What the shards really hold: stored sizes and JPEG bytes, read from the tars themselves."""
    sides, jpeg_bytes, originals = [], [], []
    for name in stats["files"]["train"]:
        with tarfile.open(folder / name) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    jpeg_bytes.append(member.size)
                elif member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    sides.append(max(meta["size"]))
                    if meta.get("original_size"):
                        originals.append(max(meta["original_size"]))
    return {
        "folder": str(folder),
        "pattern": stats["patterns"]["train"],
        "shards": stats["shards"]["train"],
        "samples": len(sides),
        "skipped_by_writer": stats["total"]["skipped"],
        "stored_long_side_median": statistics.median_low(sides),
        "stored_long_side_min": min(sides),
        "stored_at_least_1000px": sum(s >= 1000 for s in sides),
        "original_long_side_median": statistics.median_low(originals) if originals else None,
        "jpeg_kib_median": statistics.median(jpeg_bytes) / 1024,
        "total_mib": sum(jpeg_bytes) / 2**20,
    }


# ---- the children: one measurement each --------------------------------------------------------


def clip_train_preprocessing(model: str, kind: str):
    """(transform, tokenizer, settings) exactly as training builds them for this model config."""
    from clip_train.config import load_config
    from clip_train.models.image_tower import build_image_tower
    from clip_train.models.tokenizer import build_tokenizer
    from clip_train.models.transforms import build_image_transforms, image_normalization

    # run_dir and train_shards are required by the run schema but unused here
    unused = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]
    cfg = load_config([CONFIGS[model]], unused + MODEL_OVERRIDES[model])
    tower = build_image_tower(cfg.model.image)  # the transform's mean/std come from the weights' config
    crop_scale = (cfg.data.crop_scale_min, cfg.data.crop_scale_max)
    # training's loader ends at uint8 images (the step normalises the batch: BatchNormalize);
    # evaluation's at normalised floats
    train, _ = build_image_transforms(tower, cfg.model.image, crop_scale=crop_scale, uint8=True)
    _, evaluate = build_image_transforms(tower, cfg.model.image, crop_scale=crop_scale)
    mean, std = image_normalization(tower, cfg.model.image)
    settings = {
        "image_size": cfg.model.image.image_size,
        "mean": mean,
        "std": std,
        "crop_scale": [cfg.data.crop_scale_min, cfg.data.crop_scale_max],
        "context_length": cfg.model.text.context_length,
    }
    return (train if kind == "train" else evaluate), build_tokenizer(cfg.model.text), settings


def pipeline_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its children that are still
    running: the loader workers. A contention-proof companion to wall time on a shared machine,
    where another job's load changes images/s but hardly the CPU work an image costs."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    children: set[str] = set()
    for task in Path("/proc/self/task").iterdir():  # workers are forked by whichever thread
        try:
            children.update((task / "children").read_text().split())
        except OSError:
            continue
    for pid in children:
        try:
            # fields after the parenthesised command name: state is the 1st, utime the 12th, stime the 13th
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the child has just exited
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def images_and_tokens(batch) -> tuple:
    """clip_train's batches are pipeline.Batch, OpenCLIP's (images, tokens) tuples."""
    return (batch.images, batch.tokens) if hasattr(batch, "images") else (batch[0], batch[1])


def time_batches(loader, warmup: int, batches: int) -> dict:
    """Pull `warmup` batches, then time `batches` more."""
    load = os.getloadavg()[0]  # how busy the machine was as this measurement began
    start = time.perf_counter()
    it = iter(loader)
    first = None
    for _ in range(warmup):
        batch = next(it)
        first = first or time.perf_counter()
    timed_start, cpu_start = time.perf_counter(), pipeline_cpu_seconds()
    images = 0
    for _ in range(batches):
        batch = next(it)
        images += images_and_tokens(batch)[0].shape[0]
    seconds = time.perf_counter() - timed_start
    cpu = pipeline_cpu_seconds() - cpu_start
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "cpu_seconds": cpu,  # main process + workers, over the timed batches
        "cpu_ms_per_image": 1000 * cpu / images,
        "first_batch_s": (first or timed_start) - start,  # worker start + shuffle buffer + one batch
        "load_average_1min": load,
        "image_batch": list(images_and_tokens(batch)[0].shape),
        "image_dtype": str(images_and_tokens(batch)[0].dtype).replace("torch.", ""),
        "token_batch": list(images_and_tokens(batch)[1].shape),
        "token_dtype": str(images_and_tokens(batch)[1].dtype).replace("torch.", ""),
    }


def draft_api(build_train_loader) -> str | None:
    """The keyword that switches build_train_loader's JPEG draft decoding, if it has one."""
    parameters = inspect.signature(build_train_loader).parameters
    return next((name for name in ("draft_decode", "decode_size") if name in parameters), None)


def draft_kwargs(api: str | None, on: bool, image_size: int) -> dict:
    if api == "draft_decode":
        return {"draft_decode": on}
    if api == "decode_size":  # never decode below the model's image size (as train.py does)
        return {"decode_size": image_size if on else None}
    return {}


def child_clip_train(opts) -> dict:
    import torch

    from clip_train.config import DataConfig
    from clip_train.data.pipeline import build_train_loader

    transform, tokenizer, settings = clip_train_preprocessing(opts.model, opts.transform)
    api = draft_api(build_train_loader) if opts.draft != "absent" else None
    kwargs = draft_kwargs(api, opts.draft == "on", settings["image_size"])
    torch.manual_seed(opts.seed)
    data = DataConfig(train_shards=opts.shards, batch_size=opts.batch_size, num_workers=opts.workers)
    loader = build_train_loader(data, seed=opts.seed, transform=transform, tokenize=tokenizer, **kwargs)
    result = time_batches(loader, opts.warmup, opts.batches)
    return {
        **result,
        "draft_kwargs": kwargs,
        "data_errors": loader.data_errors.stats(),
        "probe_tokens": tokenizer(PROBE_CAPTION).tolist(),
        "transform": repr(transform),
    }


def child_openclip(opts) -> dict:
    import open_clip
    import torch
    import webdataset
    from open_clip.tokenizer import HFTokenizer
    from open_clip.transform import image_transform
    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args

    # OpenCLIP's CLI sees the samples per epoch only through --train-num-samples; with resampled
    # shards an epoch is that many samples per worker round. Give it more than the run pulls, plus
    # the batches the workers prefetch, so the epoch never ends inside the measurement.
    wanted = (opts.warmup + opts.batches + 4 * opts.workers) * opts.batch_size
    args = parse_args([
        "--train-data", opts.shards, "--train-num-samples", str(wanted),
        "--dataset-type", "webdataset", "--dataset-resampled",
        "--batch-size", str(opts.batch_size), "--workers", str(opts.workers), "--seed", str(opts.seed),
    ])  # fmt: skip
    # what open_clip_train.distributed.init_distributed_device sets for a single process
    args.distributed, args.world_size, args.rank, args.local_rank = False, 1, 0, 0
    torch.manual_seed(opts.seed)  # main.py's random_seed(args.seed, 0)
    mean = [float(v) for v in opts.mean.split(",")]
    std = [float(v) for v in opts.std.split(",")]
    crop_scale = tuple(float(v) for v in opts.crop_scale.split(","))
    preprocess = image_transform(
        opts.image_size, is_train=opts.transform == "train", mean=mean, std=std, aug_cfg={"scale": crop_scale}
    )
    tokenizer = HFTokenizer(opts.tokenizer_dir, context_length=opts.context_length)
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    result = time_batches(data.dataloader, opts.warmup, opts.batches)
    return {
        **result,
        "probe_tokens": tokenizer(PROBE_CAPTION)[0].tolist(),
        "transform": repr(preprocess),
        "versions": {"open_clip": open_clip.__version__, "webdataset": _version(webdataset)},
    }


def _version(module) -> str:
    import importlib.metadata

    return getattr(module, "__version__", None) or importlib.metadata.version(module.__name__)


def run_child(side: str, python: str, opts, settings: dict, tokenizer_dir: str) -> dict:
    draft = {"clip_train_draft_off": "off", "clip_train_draft_on": "on"}.get(side, "absent")
    if side.startswith("clip_train") and not settings["draft_api"]:
        draft = "absent"
    command = [
        python, str(Path(__file__).resolve()), "--child", "openclip" if side == "openclip" else "clip_train",
        "--shards", opts.shards, "--model", opts.model, "--transform", opts.transform, "--draft", draft,
        "--batch-size", str(opts.batch_size), "--workers", str(opts.workers), "--seed", str(opts.seed),
        "--warmup", str(opts.warmup), "--batches", str(opts.batches),
        "--image-size", str(settings["image_size"]), "--context-length", str(settings["context_length"]),
        "--mean", ",".join(map(str, settings["mean"])), "--std", ",".join(map(str, settings["std"])),
        "--crop-scale", ",".join(map(str, settings["crop_scale"])), "--tokenizer-dir", tokenizer_dir,
    ]  # fmt: skip
    # the same tokenizer threading on both sides (clip_train's build_tokenizer sets this default)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{side} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- report ------------------------------------------------------------------------------------


def summarise(runs: dict[str, list[dict]]) -> dict:
    sides = {}
    for side, results in runs.items():
        rates = [r["images_per_s"] for r in results]
        last = results[-1]
        sides[side] = {
            "images_per_s": statistics.median(rates),
            "all_images_per_s": rates,
            "seconds_median": statistics.median(r["seconds"] for r in results),
            "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in results),
            "all_cpu_ms_per_image": [r["cpu_ms_per_image"] for r in results],
            "load_averages": [r["load_average_1min"] for r in results],
            "images_per_run": last["images"],
            "first_batch_s_median": statistics.median(r["first_batch_s"] for r in results),
            **{k: last[k] for k in ("image_batch", "image_dtype", "token_batch", "token_dtype", "transform")},
            **({"draft_kwargs": last["draft_kwargs"]} if "draft_kwargs" in last else {}),
            **({"data_errors": [r["data_errors"] for r in results]} if "data_errors" in last else {}),
            **({"versions": last["versions"]} if "versions" in last else {}),
        }
    if "openclip" in sides:
        base, base_cpu = sides["openclip"]["images_per_s"], sides["openclip"]["cpu_ms_per_image"]
        for side in sides.values():
            side["ratio_vs_openclip"] = side["images_per_s"] / base
            side["cpu_ratio_vs_openclip"] = base_cpu / side["cpu_ms_per_image"]  # > 1: less CPU
    return sides


def label(side: str, draft_argument: str | None) -> str:
    if side == "openclip":
        return "openclip"
    if not draft_argument:
        return "clip_train (no draft argument)"
    return "clip_train draft " + side.rsplit("_", 1)[1]


def format_table(sides: dict, draft_argument: str | None) -> str:
    lines = [
        f"{'side':<30}  {'images/s':>8}  {'runs':<23}  {'vs OpenCLIP':>11}  {'CPU ms/image':>12}  "
        f"{'vs OpenCLIP':>11}  {'first batch s':>13}  {'images batch':<26}  tokens batch"
    ]
    for side, r in sides.items():
        ratio = f"{r['ratio_vs_openclip']:.2f}x" if "ratio_vs_openclip" in r else "-"
        cpu_ratio = f"{r['cpu_ratio_vs_openclip']:.2f}x" if "cpu_ratio_vs_openclip" in r else "-"
        runs = ", ".join(f"{v:.1f}" for v in r["all_images_per_s"])
        images = f"{r['image_batch']} {r['image_dtype']}"
        tokens = f"{r['token_batch']} {r['token_dtype']}"
        lines.append(
            f"{label(side, draft_argument):<30}  {r['images_per_s']:>8.1f}  {runs:<23}  {ratio:>11}  "
            f"{r['cpu_ms_per_image']:>12.2f}  {cpu_ratio:>11}  {r['first_batch_s_median']:>13.2f}  "
            f"{images:<26}  {tokens}"
        )
    loads = [load for r in sides.values() for load in r["load_averages"]]
    lines.append(
        "images/s: wall clock, median of the runs; CPU ms/image: main process + loader workers, "
        "median (vs OpenCLIP > 1 = less CPU); 1-min load average at the runs' start "
        f"{min(loads):.1f}-{max(loads):.1f}"
    )
    switches = [
        f"{label(side, draft_argument)}: {r['draft_kwargs']}"
        for side, r in sides.items()
        if r.get("draft_kwargs")
    ]
    if switches:
        lines.append("build_train_loader draft keyword: " + "; ".join(switches))
    return "\n".join(lines)


def check_same_outputs(runs: dict[str, list[dict]]) -> str | None:
    """None when every run of every side gave the same batch shapes, token dtype and probe token ids.
    The image dtype may differ: clip_train's training loader ends at uint8 (see the docstring)."""
    keys = ("image_batch", "token_batch", "token_dtype", "probe_tokens")
    seen = {side: {json.dumps([r[k] for k in keys]) for r in results} for side, results in runs.items()}
    if len(set().union(*seen.values())) == 1:
        return None
    return "; ".join(f"{side}: {', '.join(sorted(v))}" for side, v in seen.items())


# ---- main --------------------------------------------------------------------------------------


def child_main(opts) -> int:
    result = child_clip_train(opts) if opts.child == "clip_train" else child_openclip(opts)
    print(json.dumps(result))
    return 0


def setup_peer(args) -> str | None:
    """The venv's python, or None when the peer is not measured (quick mode without the venv)."""
    if args.no_peer:
        return None
    python = venv_python()
    if args.quick:
        return str(python) if python.exists() else None
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "openclip_venv.sh")], stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise RuntimeError("benchmarks/openclip_venv.sh failed (its messages are above)")
    return done.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=int, default=None, help="shard samples (default: every PNG >= --min-side)"
    )
    parser.add_argument(
        "--min-side", type=int, default=STORED_SIZE, help="smallest longer side of a source PNG"
    )
    parser.add_argument("--shard-size", type=int, default=128, help="samples per tar shard")
    parser.add_argument(
        "--shards-dir", type=Path, default=None, help=f"default $CLIP_TRAIN_CACHE/{SHARDS_NAME}"
    )
    parser.add_argument(
        "--model", choices=sorted(CONFIGS), default=None, help="default demo (tiny with --quick)"
    )
    parser.add_argument("--transform", choices=("train", "eval"), default="train")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (8 with --quick)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed batches (default 4, 2 with --quick)"
    )
    parser.add_argument(
        "--batches", type=int, default=None, help="timed batches (default 24, 4 with --quick)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="default 3, or 1 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peer", action="store_true", help="measure clip_train only")
    parser.add_argument("--quick", action="store_true", help="synthetic shards, tiny model: a smoke run")
    parser.add_argument("--out", default="benchmarks/results/data.json")
    # child mode (one measurement; run by the parent, the OpenCLIP one with the venv's python)
    parser.add_argument("--child", choices=("clip_train", "openclip"), help=argparse.SUPPRESS)
    for flag in ("--shards", "--draft", "--mean", "--std", "--crop-scale", "--tokenizer-dir"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--context-length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    quick = args.quick
    args.model = args.model or ("tiny" if quick else "demo")
    args.batch_size = args.batch_size or (8 if quick else 64)
    args.repeats = args.repeats or (1 if quick else 3)
    workers = max(1, args.workers)
    # whole rounds of the workers' turns (see the module docstring)
    args.warmup = -(-(args.warmup or (2 if quick else 4)) // workers) * workers
    args.batches = -(-(args.batches or (4 if quick else 24)) // workers) * workers
    if min(args.batch_size, args.repeats, args.shard_size) < 1 or args.workers < 0:
        parser.error("--batch-size, --repeats and --shard-size must be at least 1, --workers at least 0")

    from clip_train.data import DataError
    from clip_train.data.pipeline import build_train_loader

    draft_argument = draft_api(build_train_loader)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if quick:
                folder = Path(tmp) / "shards"
                records = synthetic_records(QUICK_SAMPLES, STORED_SIZE)
                stats = build_shards(folder, records, {"source": "synthetic"}, shard_size=8, num_procs=1)
            else:
                folder = (args.shards_dir or cache_dir() / SHARDS_NAME).resolve()
                records = large_openclipart(args.min_side, args.samples)
                recipe = {"source": "openclipart", "min_side": args.min_side, "samples": args.samples}
                stats = build_shards(folder, records, recipe, shard_size=args.shard_size, num_procs=2)
            shards = shard_summary(folder, stats)
            args.shards = f"{folder}/{shards['pattern']}"
            peer_python = setup_peer(args)
        except (DataError, RuntimeError) as e:
            print(f"data.py: error: {e}", file=sys.stderr)
            return 2

        _, tokenizer, settings = clip_train_preprocessing(args.model, args.transform)
        settings["draft_api"] = draft_argument
        tokenizer_dir = str(Path(tmp) / "tokenizer")
        tokenizer.save_pretrained(tokenizer_dir)  # the OpenCLIP side loads the same files (HFTokenizer)

        sides = ([] if peer_python is None else ["openclip"]) + ["clip_train_draft_off"]
        if draft_argument:
            sides.append("clip_train_draft_on")
        print(
            f"{shards['samples']} samples in {shards['shards']} shards ({folder}), stored long side median "
            f"{shards['stored_long_side_median']} px; {args.model} model, {args.transform} transform at "
            f"{settings['image_size']} px, batch {args.batch_size}, {args.workers} workers, "
            f"{args.warmup} warm-up + {args.batches} timed batches, {args.repeats} repeat(s)",
            flush=True,
        )
        if not draft_argument:
            print(
                "build_train_loader has no draft_decode/decode_size argument: one clip_train row", flush=True
            )
        if peer_python is None:
            why = "--no-peer" if args.no_peer else f"no {venv_python()}: bash benchmarks/openclip_venv.sh"
            print(f"OpenCLIP side skipped ({why})", flush=True)

        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            order = sides[repeat % len(sides) :] + sides[: repeat % len(sides)]
            for side in order:
                python = peer_python if side == "openclip" else sys.executable
                try:
                    result = run_child(side, python, args, settings, tokenizer_dir)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"data.py: error: {e}", file=sys.stderr)
                    return 1
                runs[side].append(result)
                print(
                    f"  repeat {repeat + 1}: {label(side, draft_argument):<32} "
                    f"{result['images_per_s']:8.1f} images/s",
                    flush=True,
                )

    summary = summarise(runs)
    print()
    print(format_table(summary, draft_argument))
    mismatch = check_same_outputs(runs)
    if mismatch:
        print(
            f"data.py: error: the sides return different batches or token ids ({mismatch}); "
            "no results written",
            file=sys.stderr,
        )
        return 1
    if "openclip" in summary and draft_argument:
        print(
            f"clip_train draft on / OpenCLIP: {summary['clip_train_draft_on']['ratio_vs_openclip']:.2f}x "
            f"(target {TARGET_RATIO}x)"
        )

    import torch

    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # the machine may be shared: how busy it was
        "quick": quick,
        "model": args.model,
        "transform": args.transform,
        **{k: v for k, v in settings.items() if k != "draft_api"},
        "batch_size": args.batch_size,
        "workers": args.workers,
        "warmup_batches": args.warmup,
        "timed_batches": args.batches,
        "repeats": args.repeats,
        "seed": args.seed,
        "draft_argument": draft_argument,  # the build_train_loader keyword used, or None
        "openclip_python": peer_python,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "shards": shards, "sides": summary, "target_ratio": TARGET_RATIO}
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
