"""Train a CLIP model on webdataset shards. Reads top to bottom: build, resume, loop, finish.

    clip-train configs/tiny.yaml run_dir=runs/tiny data.train_shards=...      # CPU smoke run
    bash launch/quickstart.sh                                                 # the demo recipe
    torchrun --nproc_per_node 2 -m clip_train train configs/tiny.yaml ...     # 2 processes, gloo on CPU
    accelerate launch --config_file launch/accelerate/gpu_8.yaml -m clip_train train configs/demo.yaml ...

Data order: the loader is rebuilt at every checkpoint boundary with a seed derived from
(seed, segment), where a segment is the span of steps between two checkpoints. An uninterrupted run
and a run resumed from the checkpoint at the start of a segment therefore read the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file

from clip_train import checkpoint, preemption
from clip_train.accumulation import accumulated_backward, batch_statistics_layers, capture_rng, restore_rng
from clip_train.config import (
    ConfigError,
    DataConfig,
    RunConfig,
    check_run_dir,
    save_config,
    to_dict,
    validate,
)
from clip_train.data import DataError
from clip_train.data.pipeline import (
    Source,
    build_train_loader,
    check_readers,
    expand_urls,
    in_worker_order,
)
from clip_train.data.quality import SKIP_REASONS, DataCounts, SkipRateGuard, add_shard_counts
from clip_train.evaluate.encode import image_chunk_size, in_chunks
from clip_train.evaluate.runner import run_evaluation
from clip_train.finetune import default_metrics, format_wise_table, wise_ft_sweep, write_wise
from clip_train.flops import FlopMetrics, count_training_flops
from clip_train.loss.contrastive import ContrastiveLoss
from clip_train.models.arch import arch_model_config
from clip_train.models.clip import ClipModel, config_from_saved, find_model_folder, load_saved_weights
from clip_train.models.towers import batch_normalizer, build_image_transforms, build_tokenizer
from clip_train.optim import build_optimizer, build_scheduler, trainable_summary
from clip_train.tracking import MetricsLogger

ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
# Test hook: SIGKILL this process right after finishing the given step, to test resume after a
# real, unannounced death (no handler, no flush beyond what was already written).
KILL_AT_STEP_ENV = "CLIP_TRAIN_TEST_KILL_AT_STEP"
# Test hook: "STEP:RANK": that rank sends itself SIGUSR1 as it starts the given step (a preemption
# warning reaching one process only), to test that every rank checkpoints its own data stream.
SIGNAL_AT_STEP_ENV = "CLIP_TRAIN_TEST_SIGNAL_AT_STEP"
# Test hook: make the loss NaN at these steps (comma-separated), to test the non-finite step skip.
NAN_AT_STEPS_ENV = "CLIP_TRAIN_TEST_NAN_AT_STEPS"


@dataclass
class TrainState:
    """What must survive a restart besides model/optimizer/scheduler/RNG (saved by accelerate)."""

    step: int = 0
    samples_seen: int = 0
    # Where this process's data stream of the checkpoint segment stands: the pass over
    # non-resampled shards, and per loader worker the last raw sample position used (see
    # build_train_loader). Each rank's stream is its own (it skips its own bad samples).
    data_pass: int = 0
    data_positions: dict[int, int] = dataclasses.field(default_factory=dict)
    data_next_worker: int = 0  # the loader worker whose batch comes next (they take turns)
    # the skip-rate guard's window: [read, skipped] totals of the run (see SkipRateGuard)
    skip_history: list = dataclasses.field(default_factory=list)
    rank: int = 0  # not saved: which entry of the saved per-rank data state is this process's
    # every rank's data state, filled by gather_data_state() before a save; accelerate writes the
    # main process's state_dict only, so the other ranks' streams must travel in it
    data_by_rank: dict[int, dict] = dataclasses.field(default_factory=dict)

    def local_data_state(self) -> dict:
        return {
            "pass": self.data_pass,
            "positions": dict(self.data_positions),
            "next_worker": self.data_next_worker,
        }

    def gather_data_state(self) -> None:
        """Collect every rank's data state (all processes must call it)."""
        from accelerate.utils import gather_object

        self.data_by_rank = dict(enumerate(gather_object([self.local_data_state()])))

    def state_dict(self) -> dict:
        data = self.data_by_rank or {self.rank: self.local_data_state()}
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "data_by_rank": data,
            "skip_history": self.skip_history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.skip_history = state.get("skip_history", [])  # absent in checkpoints before the guard
        if "data_by_rank" in state:
            by_rank = {int(r): d for r, d in state["data_by_rank"].items()}
            # A rank the checkpoint has no entry for (more processes than it was saved with, accepted
            # by train.allow_resume_change) starts its segment's stream from the beginning.
            mine = by_rank.get(self.rank, {})
        else:  # a checkpoint from before per-rank data state: its one (main process's) state for all
            mine = {
                "pass": state.get("data_pass", 0),
                "positions": state.get("data_positions", {}),
                "next_worker": state.get("data_next_worker", 0),
            }
        self.data_pass = int(mine.get("pass", 0))
        self.data_positions = {int(w): int(n) for w, n in mine.get("positions", {}).items()}
        self.data_next_worker = int(mine.get("next_worker", 0))
        self.data_by_rank = {}


class ImageFeatureCache:
    """Outputs of a fully locked image tower, per sample key (train.cache_image_features).

    Exact, not an approximation: the locked tower's BatchNorm layers are frozen (fixed statistics in
    any mode), timm towers built with num_classes=0 have no dropout on their features, and the
    training images get the deterministic eval transform, so recomputing gives the same values.
    Not saved in checkpoints; a resumed run refills it with the same values.
    """

    def __init__(self, chunk: int):
        self.features: dict[str, torch.Tensor] = {}
        self.chunk = chunk  # images per tower call (eval.image_chunk, resolved for the device)

    @torch.no_grad()
    def lookup(self, model: ClipModel, images: torch.Tensor, keys: list[str], autocast) -> torch.Tensor:
        missing = [i for i, key in enumerate(keys) if key not in self.features]
        if missing:
            with autocast():
                computed = in_chunks(model.image_tower_features, images[missing], self.chunk).float().cpu()
            for i, feature in zip(missing, computed):
                self.features[keys[i]] = feature
        return torch.stack([self.features[key] for key in keys]).to(images.device)


def training_transforms(model: ClipModel, cfg: RunConfig) -> tuple:
    """(augmented train, fixed eval view, float eval) image transforms of a run.

    The training loader's workers stop at uint8 images; next_micro_batch normalises the batch on
    the device (see BatchNormalize). Evaluation keeps the float transform.
    """
    train, fixed_view = build_image_transforms(
        model.visual,
        cfg.model.image,
        crop_scale=(cfg.data.crop_scale_min, cfg.data.crop_scale_max),
        uint8=True,
    )
    _, evaluate = build_image_transforms(model.visual, cfg.model.image)
    return train, fixed_view, evaluate


def sum_over_ranks(values: list[float], device) -> list[float]:
    """values summed over all ranks: one all-reduce, which every rank must call at the same point."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag true on every rank when it is true on at least one."""
    return [v > 0 for v in sum_over_ranks([float(f) for f in flags], device)]


def train_sources(data: DataConfig) -> list[Source]:
    if data.sources:
        return [Source(s.name, s.shards, s.weight) for s in data.sources]
    return [Source("train", data.train_shards)]


def check_skip_rate(guard: SkipRateGuard, totals: list[int], shard_counts) -> None:
    """totals: the run's [good, skipped per reason] over all ranks. Raises DataQualityError on every
    rank at once (they agree on the totals); the worst shards are gathered from all of them."""
    frac = guard.update(sum(totals), sum(totals[1:]))
    if frac is None:
        return
    from accelerate.utils import gather_object

    shards: dict[str, tuple[int, int]] = {}
    for counts in gather_object([shard_counts()]):
        shards = add_shard_counts(shards, counts)
    raise guard.error(frac, dict(zip(SKIP_REASONS, totals[1:], strict=True)), shards)


def due(step: int, every: int, total: int) -> bool:
    """The one gate for periodic work: every `every` steps (0 = never), and always at the last."""
    return step == total or (every > 0 and step % every == 0)


def segment_seed(seed: int, segment: int, data_pass: int) -> int:
    digest = hashlib.sha256(f"{seed}/{segment}/{data_pass}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def main(cfg: RunConfig) -> dict:
    preemption.install()  # clip-train did already; here for callers of main() itself
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir)  # before anything else: a wrong path costs nothing and leaves nothing
    validate(cfg)
    # Fail on missing shards, or on readers left without a shard, before a model is built or a
    # process group waits. (WORLD_SIZE: set by torchrun / accelerate launch before we start.)
    sources = train_sources(cfg.data)
    for source in sources:
        expand_urls(source.shards, split="train")
    check_readers(
        sources,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        num_workers=cfg.data.num_workers,
        resampled=cfg.data.resampled,
    )
    if cfg.data.val_shards:
        expand_urls(cfg.data.val_shards)
    resume_from = checkpoint.resolve_resume(run_dir, cfg.train.resume)

    # Without a GPU, Accelerate must be told it runs on the CPU: otherwise under torchrun it sets
    # up no DDP (each process would train alone) while torch.distributed is initialised.
    use_cpu = cfg.train.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=ACCELERATE_PRECISION[cfg.train.precision], cpu=use_cpu)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.finetune.wise_alphas and accelerator.distributed_type == DistributedType.FSDP:
        # the sweep interpolates the unwrapped module's weights in place, which FSDP holds as shards
        raise ConfigError(
            "finetune.wise_alphas is not supported under FSDP: launch with DDP or drop the sweep"
        )
    init_folder = None
    if cfg.model.arch:  # an OpenCLIP architecture by name, resolved (like init_from) before the fingerprint
        cfg.model = arch_model_config(cfg.model)
    if cfg.model.init_from:  # fine-tuning a saved model: its architecture, this run's locks
        init_folder = find_model_folder(cfg.model.init_from)
        # resolved before the fingerprint below, so that the saved config.yaml (which holds the
        # resolved architecture) resumes the run too
        cfg.model = config_from_saved(init_folder, cfg.model)
        validate(cfg)  # the saved architecture (a label prior, say) against what trains
    expected_meta = {
        "model": to_dict(cfg.model),
        # everything below decides which samples each step reads (see the module docstring)
        "world_size": world,
        "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "accum_steps": cfg.train.accum_steps,
        "ckpt_every": cfg.train.ckpt_every,
        "data": [[source.name, source.shards, source.weight] for source in sources],
    }
    if resume_from is not None:  # refuse an incompatible resume before anything heavy is built
        changed = checkpoint.check_compatible(
            checkpoint.read_meta(resume_from),
            expected_meta,
            resume_from,
            allow_data_order_change=cfg.train.allow_resume_change,
        )
        if changed and accelerator.is_main_process:
            print(
                f"warning: resuming from {resume_from} with {changed}: the data order from here on "
                "differs from an uninterrupted run (train.allow_resume_change=true)",
                flush=True,
            )

    # ---------------------------------------------------------------- model, loss, optimizer
    set_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = ClipModel(cfg.model)
    # model FLOPs of one pair, before checkpointing/compile (side-effect free: clip_train/flops.py)
    flop_metrics = FlopMetrics(count_training_flops(model).per_sample, world, cfg.train.peak_flops)
    if init_folder is not None:
        load_saved_weights(model, init_folder)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.train.compile:
        model.compile(backend=cfg.train.compile_backend)
    tokenizer = build_tokenizer(cfg.model.text)
    train_transform, fixed_view_transform, eval_transform = training_transforms(model, cfg)
    # one buffer per micro-batch of a step: a step holds all of its micro-batches (see reuse)
    normalize_images = batch_normalizer(model.visual, cfg.model.image, reuse=cfg.train.accum_steps)
    # The run directory is made only once the model is built: a bad model setting leaves nothing.
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg.log, to_dict(cfg), enabled=accelerator.is_main_process)
    feature_cache = None
    if cfg.train.cache_image_features:
        feature_cache = ImageFeatureCache(image_chunk_size(accelerator.device, cfg.eval.image_chunk))
        train_transform = fixed_view_transform  # one fixed view per sample (see ImageFeatureCache)
    loss_fn = ContrastiveLoss(cfg.loss.kind, cfg.loss.impl, cfg.loss.block_size)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.optim)
    # The webdataset loader is deliberately not prepared: it already splits shards by rank, and
    # prepare() would dispatch or stride its batches a second time.
    # The scheduler is not prepared either: Accelerate's wrapper steps it once per process on each
    # optimizer step (it assumes a prepared, shortened loader), which would run the schedule W times
    # too fast here. Registered, it is still saved and restored with the checkpoint.
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState(rank=rank)
    accelerator.register_for_checkpointing(scheduler, state)
    set_seed(cfg.train.seed + rank)  # dropout and augmentation differ across ranks

    # ---------------------------------------------------------------- resume
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    results_path = run_dir / "results.json"
    if state.step >= cfg.train.steps and results_path.is_file():
        # A finished run started again (e.g. quickstart re-run): report, do not redo or overwrite.
        accelerator.print(f"{run_dir} already finished {state.step} steps")
        logger.close()
        accelerator.end_training()
        return {k: v for k, v in json.loads(results_path.read_text()).items() if isinstance(v, float)}
    if accelerator.is_main_process:
        num_params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        accelerator.print(
            f"run_dir {run_dir}  params {num_params / 1e6:.2f}M ({trainable / 1e6:.2f}M trainable: "
            f"{trainable_summary(model)})"
        )

    unwrapped = accelerator.unwrap_model(model)

    def export_model(folder: Path, state: dict | None = None) -> None:
        unwrapped.save_pretrained(folder, tokenizer, state_dict=state)

    def gathered_exporter():
        """export_model for the main process, to be made on every process: under FSDP each holds
        only its shards, and accelerator.get_state_dict gathers the full weights (a collective).
        Not tested here (FSDP needs GPUs); DDP and single-process runs write the module's own."""
        if accelerator.distributed_type != DistributedType.FSDP:
            return export_model
        return partial(export_model, state=accelerator.get_state_dict(model))

    def save_checkpoint() -> None:
        """Every process: the full state at state.step, every rank's data stream included."""
        state.gather_data_state()
        state.skip_history = skip_guard.state()
        meta = {**expected_meta, "samples_seen": state.samples_seen}
        checkpoint.save(accelerator, run_dir, state.step, meta, cfg.train.keep_last, gathered_exporter())

    # WiSE-FT interpolates towards the weights training started from: a saved model when fine-tuning
    # one (init_from), else the model as built at step 0, saved once so a resumed run has it too.
    start_model_dir = init_folder or run_dir / "start_model"
    if cfg.finetune.wise_alphas and init_folder is None and resume_from is None:
        exporter = gathered_exporter()
        if accelerator.is_main_process:
            exporter(start_model_dir)
        accelerator.wait_for_everyone()

    def evaluate(step: int) -> dict:
        # Every rank encodes its share of the evaluation data and gets the same metrics; the main
        # process writes the files and the log.
        metrics = run_evaluation(
            unwrapped,
            tokenizer,
            eval_transform,
            cfg.eval,
            cfg.data.val_shards,
            accelerator.device,
            cfg.train.precision,
            out_dir=run_dir / "eval" / f"step-{step:09d}",
            model_name=run_dir.name,
        )
        logger.log("eval", step, metrics)
        return metrics

    # ---------------------------------------------------------------- data
    total = cfg.train.steps
    segment_len = cfg.train.ckpt_every if cfg.train.ckpt_every > 0 else total
    if state.step % segment_len == 0:  # a new segment starts: its stream from the beginning
        state.data_pass, state.data_positions, state.data_next_worker = 0, {}, 0

    def make_loader(step: int, skip_through: dict[int, int] | None = None):
        data_counts.retire(loader)
        return build_train_loader(
            sources,
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            seed=segment_seed(cfg.train.seed, step // segment_len, state.data_pass),
            rank=rank,
            world_size=world,
            transform=train_transform,
            tokenize=tokenizer,
            resampled=cfg.data.resampled,
            shard_shuffle=cfg.data.shard_shuffle,
            sample_shuffle=cfg.data.sample_shuffle,
            image_key=cfg.data.image_key,
            text_key=cfg.data.text_key,
            max_pixels=cfg.data.max_pixels,
            with_keys=True,  # sample keys: the feature cache, and the log of skipped steps
            decode_size=cfg.model.image.image_size if cfg.data.fast_decode else None,
            skip_through=skip_through,
        )

    # ---------------------------------------------------------------- loop
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0"))
    signal_at = tuple(int(x) for x in os.environ.get(SIGNAL_AT_STEP_ENV, "0:0").split(":"))
    accum = cfg.train.accum_steps
    global_batch = cfg.data.batch_size * world * accum  # pairs in one contrastive batch
    inexact = batch_statistics_layers(unwrapped) if accum > 1 else []
    if inexact and accelerator.is_main_process:
        print(
            f"warning: train.accum_steps={accum} with {len(inexact)} BatchNorm layers that train "
            f"({inexact[0]}, ...): each micro-batch is normalised on its own, so a step is not exactly "
            f"one batch of {global_batch}; lock the tower with frozen statistics, or use accum_steps=1",
            flush=True,
        )
    logger.log(
        "setup",
        state.step,
        {
            "loss_kind": cfg.loss.kind,
            "loss_impl": loss_fn.impl,
            "block_size": cfg.loss.block_size,
            "accum_steps": accum,
            "world_size": world,
            "contrastive_batch": global_batch,
            # layers that make accumulation differ from one big batch (see batch_statistics_layers)
            "accumulation_batchnorm_layers": len(inexact),
        },
    )
    # Resumed inside a segment (from a preemption checkpoint): the loader drops, undecoded, the
    # samples the interrupted run had used, so the data continues exactly where it stopped.
    # Starting a loader's iterator draws from torch's RNG (DataLoader's base seed); inside a
    # segment the checkpoint's RNG state already holds that draw: put the state back after it.
    data_counts = DataCounts([source.name for source in sources])
    skip_guard = SkipRateGuard(cfg.data.max_skip_frac, cfg.data.skip_window, state.skip_history)
    loader = None
    rng_before_loader = (capture_rng(), random.getstate(), np.random.get_state())
    loader = make_loader(state.step, skip_through=state.data_positions)
    batches = in_worker_order(
        iter(loader), num_workers=cfg.data.num_workers, first_worker=state.data_next_worker
    )
    if state.step % segment_len:
        restore_rng(rng_before_loader[0])
        random.setstate(rng_before_loader[1])
        np.random.set_state(rng_before_loader[2])
        skipped = sum(state.data_positions.values())
        accelerator.print(f"resumed inside a data segment: skipping {skipped} samples already used")

    def next_micro_batch(encode: bool = True) -> tuple:
        """(images or None, tokens, cached image features or None) on the device, and the keys."""
        nonlocal loader, batches
        fetch_start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # one pass over non-resampled shards ended: start the next pass
            state.data_pass += 1
            state.data_positions, state.data_next_worker = {}, 0
            loader = make_loader(state.step)
            batches = iter(loader)
            batch = next(batches, None)
            if batch is None:
                raise DataError(
                    f"rank {rank}'s shards yield no full batch of {cfg.data.batch_size}: "
                    "lower data.batch_size or set data.resampled=true"
                ) from None
        window["data_wait"] += time.perf_counter() - fetch_start
        images, tokens, keys = batch[0].to(accelerator.device), batch[1].to(accelerator.device), batch[3]
        images = normalize_images(images)
        data_counts.add_sources(batch[4])
        for worker, position in batch[5]:  # positions only grow within a worker's stream
            state.data_positions[worker] = max(position, state.data_positions.get(worker, 0))
        state.data_next_worker = (batch[5][0][0] + 1) % max(cfg.data.num_workers, 1)
        if feature_cache is None or not encode:
            return (images, tokens, None), keys
        return (None, tokens, feature_cache.lookup(unwrapped, images, keys, accelerator.autocast)), keys

    window = {"loss": 0.0, "steps": 0, "data_wait": 0.0, "start": time.perf_counter()}
    eval_metrics: dict = {}

    nan_at = {int(s) for s in os.environ.get(NAN_AT_STEPS_ENV, "").split(",") if s.strip()}
    consecutive_skips = 0
    last_eval_step = -1
    model.train()
    if state.step < total and any_rank([preemption.requested()], accelerator.device)[0]:
        # signalled during start-up: nothing trained since the checkpoint resumed from (or none)
        stop_preempted(logger, accelerator, state, "before its first step")
    logger.start_progress(total, state.step)
    step_start = time.perf_counter()
    while state.step < total:
        if signal_at == (state.step + 1, rank):
            os.kill(os.getpid(), signal.SIGUSR1)
        fetched = [next_micro_batch() for _ in range(accum)]
        micro_batches = [inputs for inputs, _ in fetched]
        if accum == 1:
            with accelerator.autocast():
                loss = loss_fn(*model(*micro_batches[0]))
            if state.step + 1 in nan_at:
                loss = loss * float("nan")
            accelerator.backward(loss)
        else:
            loss = accumulated_backward(
                model,
                micro_batches,
                loss_fn,
                autocast=accelerator.autocast,
                backward=accelerator.backward,
                no_sync=lambda: accelerator.no_sync(model),
            )
        # The norm is needed to see a non-finite gradient even without clipping (max_norm inf).
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        # Under fp16 the GradScaler itself skips steps with non-finite gradients and lowers its
        # scale (optimizer.step must still run for that); only a non-finite loss is ours to skip.
        bad_grad = cfg.train.precision != "fp16" and not torch.isfinite(grad_norm).item()
        # One all-reduce per step agrees on all three: skip this step? stop after it (a signal
        # arrived)? too many bad samples over all workers and ranks?
        flags = [not torch.isfinite(loss).item() or bad_grad, preemption.requested()]
        agreed = sum_over_ranks([*map(float, flags), *data_counts.totals(loader)], accelerator.device)
        non_finite, preempt = agreed[0] > 0, agreed[1] > 0
        check_skip_rate(skip_guard, [int(v) for v in agreed[2:]], partial(data_counts.shard_counts, loader))
        if non_finite:
            consecutive_skips += 1
            logger.log(
                "skip",
                state.step + 1,
                {
                    "loss": loss.item(),
                    "grad_norm": float(grad_norm),
                    "consecutive": consecutive_skips,
                    "keys": [key for _, keys in fetched for key in keys][:64],
                },
            )
            optimizer.zero_grad(set_to_none=True)
            if consecutive_skips >= cfg.train.max_consecutive_skips:
                raise FloatingPointError(
                    f"{consecutive_skips} consecutive non-finite steps up to step {state.step + 1}: lower "
                    "optim.lr or use train.precision=fp32 (resume: auto restarts from the last checkpoint)"
                )
        else:
            consecutive_skips = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            unwrapped.clamp_logit_scale()
            window["loss"] += loss.detach().float()
            window["steps"] += 1
        state.step += 1
        state.samples_seen += global_batch
        now = time.perf_counter()
        logger.advance(loss, global_batch / (now - step_start))  # reads the loss only for a bar
        step_start = now

        if due(state.step, cfg.train.log_every, total) and window["steps"]:
            elapsed = time.perf_counter() - window["start"]
            mean_loss = accelerator.reduce(window["loss"] / window["steps"], reduction="mean").item()
            logger.log(
                "train",
                state.step,
                {
                    "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "logit_scale": unwrapped.logit_scale.exp().item(),
                    **(
                        {"logit_bias": unwrapped.logit_bias.item()}
                        if unwrapped.logit_bias is not None
                        else {}
                    ),
                    "grad_norm": float(grad_norm),
                    "samples_per_s": window["steps"] * global_batch / elapsed,
                    **flop_metrics(window["steps"] * global_batch / elapsed),
                    "data_wait_frac": window["data_wait"] / elapsed,
                    "samples_seen": state.samples_seen,
                    **data_counts.metrics(loader, partial(sum_over_ranks, device=accelerator.device)),
                },
            )
            window = {"loss": 0.0, "steps": 0, "data_wait": 0.0, "start": time.perf_counter()}
        if due(state.step, cfg.train.eval_every, total) and (cfg.eval.zeroshot or cfg.data.val_shards):
            eval_metrics = evaluate(state.step)
            last_eval_step = state.step
        if due(state.step, cfg.train.ckpt_every, total):
            save_checkpoint()
            if state.step < total:
                state.data_pass, state.data_positions, state.data_next_worker = 0, {}, 0
                loader = make_loader(state.step)  # a new segment starts (see the module docstring)
                batches = iter(loader)
        if kill_at and state.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if state.step < total and preempt:
            if not due(state.step, cfg.train.ckpt_every, total):  # else just saved
                save_checkpoint()
            stop_preempted(logger, accelerator, state, "checkpointed")

    # ---------------------------------------------------------------- finish
    if last_eval_step != state.step and (cfg.eval.zeroshot or cfg.data.val_shards):
        # resumed from the final checkpoint of a run killed before its final evaluation
        eval_metrics = evaluate(state.step)
    wise = None
    if cfg.finetune.wise_alphas:
        wise = run_wise_ft(unwrapped, start_model_dir, cfg, tokenizer, eval_transform, accelerator, run_dir)
    exporter = gathered_exporter()
    if accelerator.is_main_process:
        exporter(run_dir / "model")
        summary = {"step": state.step, "samples_seen": state.samples_seen, **eval_metrics}
        if wise is not None:
            summary["wise"] = wise
        results_path.write_text(json.dumps(summary, indent=1))
        logger.log("summary", state.step, summary, console=False)
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return eval_metrics


def stop_preempted(logger: MetricsLogger, accelerator: Accelerator, state: TrainState, what: str) -> None:
    """Record the stop and leave with Preempted (clip-train exits 75: requeue and resume)."""
    logger.log(
        "preempted", state.step, {"samples_seen": state.samples_seen, "signal": preemption.signal_name()}
    )
    logger.close()
    accelerator.end_training()
    raise preemption.Preempted(
        f"stopped at step {state.step} after a preemption signal ({what}): run again to resume"
    )


def run_wise_ft(model, start_dir: Path, cfg: RunConfig, tokenizer, transform, accelerator, run_dir: Path):
    """Evaluate (1 - a) * start + a * end for each a of finetune.wise_alphas; print the table,
    write eval/wise/wise.json and wise.png; return {"domain_metric", "reference_metric", "rows"}."""
    start_state = load_file(str(Path(start_dir) / "model.safetensors"))
    out = run_dir / "eval" / "wise"

    def evaluate_at(alpha: float) -> dict:
        name = f"alpha-{alpha:g}"
        return run_evaluation(
            model, tokenizer, transform, cfg.eval, cfg.data.val_shards, accelerator.device,
            cfg.train.precision, out_dir=out / name, model_name=f"{run_dir.name}-wise-{name}",
        )  # fmt: skip

    rows = wise_ft_sweep(model, start_state, cfg.finetune.wise_alphas, evaluate_at)
    domain, reference = default_metrics(rows)
    domain = cfg.finetune.domain_metric or domain
    reference = cfg.finetune.reference_metric or reference
    for metric in (domain, reference):
        if metric not in rows[0]:
            choices = ", ".join(k for k in rows[0] if k != "alpha")
            raise ConfigError(
                f"finetune metric {metric!r} is not among the evaluation's metrics: choose from {choices}"
            )
    if accelerator.is_main_process:
        write_wise(rows, out, domain, reference, plot=cfg.eval.plots)
        accelerator.print(
            f"WiSE-FT (alpha 0 = start, 1 = fine-tuned):\n{format_wise_table(rows, domain, reference)}"
        )
    return {"domain_metric": domain, "reference_metric": reference, "rows": rows}


def format_results(metrics: dict) -> str:
    """A small table of the headline metrics for the console."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, float) and not math.isnan(v)]
    width = max((len(k) for k, _ in rows), default=10)
    return "\n".join(f"  {k:<{width}}  {v:.4f}" for k, v in rows)
