"""The trainer: built from a run config, then fit() reads top to bottom: resume, loop, finish.

    trainer = Trainer(cfg)        # everything built, the checkpoint (if any) loaded
    metrics = trainer.fit()       # train to cfg.train.steps, evaluate, export the model

Each part lives in its own module: build.py (model, transforms, optimizer), data_stream.py (the
batches and where they stand), step.py (gradients and the non-finite guard), checkpointing.py
(resume and save), hooks.py (what tests and extensions may do at each step).
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import set_seed

from clip_train import preemption
from clip_train.accumulation import batch_statistics_layers
from clip_train.config import RunConfig, save_config, to_dict
from clip_train.data.pipeline import config_sources
from clip_train.distributed import any_rank, sum_over_ranks
from clip_train.evaluate.encode import image_chunk_size
from clip_train.evaluate.runner import run_evaluation
from clip_train.models.tokenizer import build_tokenizer
from clip_train.models.transforms import batch_normalizer
from clip_train.optim import trainable_summary
from clip_train.tracking import MetricsLogger
from clip_train.train.build import (
    build_accelerator,
    build_model,
    build_optimization,
    check_before_start,
    resolve_model_config,
    training_transforms,
)
from clip_train.train.checkpointing import CheckpointManager, run_fingerprint
from clip_train.train.data_stream import DataStream
from clip_train.train.ema import WeightEma
from clip_train.train.feature_cache import ImageFeatureCache
from clip_train.train.finish import run_wise_ft
from clip_train.train.hooks import TrainHooks
from clip_train.train.state import TrainState
from clip_train.train.step import Gradients, NonFiniteGuard, apply_update, compute_gradients
from clip_train.train.teacher import build_distillation


def due(step: int, every: int, total: int) -> bool:
    """The one gate for periodic work: every `every` steps (0 = never), and always at the last."""
    return step == total or (every > 0 and step % every == 0)


class TrainWindow:
    """What the next "train" log record averages over: the steps since the last one."""

    def __init__(self):
        self.loss, self.steps, self.data_wait, self.start = 0.0, 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.steps += 1


class Trainer:
    def __init__(self, cfg: RunConfig, hooks: TrainHooks | None = None):
        preemption.install()  # clip-train did already; here for callers of the trainer itself
        check_before_start(cfg)  # a wrong path or setting costs nothing and leaves nothing
        self.cfg, self.hooks = cfg, hooks or TrainHooks()
        self.run_dir = Path(cfg.run_dir)
        self.accelerator = accelerator = build_accelerator(cfg)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.init_folder = resolve_model_config(cfg)
        self.sources = config_sources(cfg.data)
        # refuses an incompatible resume before anything heavy is built
        self.checkpoints = CheckpointManager(cfg, accelerator, run_fingerprint(cfg, self.sources, self.world))
        self._build_parts()
        self.state = TrainState(rank=self.rank)
        accelerator.register_for_checkpointing(self.scheduler, self.state, *self.ema.checkpointed())
        set_seed(cfg.train.seed + self.rank)  # dropout and augmentation differ across ranks
        if self.checkpoints.resume_from is not None:
            self.checkpoints.resume()
            accelerator.print(f"resumed from {self.checkpoints.resume_from} at step {self.state.step}")
        self.global_batch = cfg.data.batch_size * self.world * cfg.train.accum_steps  # one contrastive batch
        self.guard = NonFiniteGuard(cfg.train.max_consecutive_skips)
        self.eval_metrics: dict = {}
        self.last_eval_step = -1

    def _build_parts(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        model, self.flop_metrics = build_model(cfg, self.init_folder, self.world)
        self.tokenizer = build_tokenizer(cfg.model.text)
        self.train_transform, fixed_view, self.eval_transform = training_transforms(model, cfg)
        # one buffer per micro-batch of a step: a step holds all of its micro-batches (see reuse)
        self.normalize_images = batch_normalizer(model.visual, cfg.model.image, reuse=cfg.train.accum_steps)
        # The run directory is made only once the model is built: a bad model setting leaves nothing.
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(self.run_dir, cfg.log, to_dict(cfg), enabled=accelerator.is_main_process)
        self.feature_cache = None
        if cfg.train.cache_image_features:
            self.feature_cache = ImageFeatureCache(image_chunk_size(accelerator.device, cfg.eval.image_chunk))
            self.train_transform = fixed_view  # one fixed view per sample (see ImageFeatureCache)
        self.loss_fn, optimizer, self.scheduler = build_optimization(model, cfg)
        self.distill = build_distillation(cfg, model, accelerator.device, self.loss_fn)  # None: off
        # The webdataset loader is deliberately not prepared: it already splits shards by rank, and
        # prepare() would dispatch or stride its batches a second time.
        # The scheduler is not prepared either: Accelerate's wrapper steps it once per process on each
        # optimizer step (it assumes a prepared, shortened loader), which would run the schedule W
        # times too fast here. Registered, it is still saved and restored with the checkpoint.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.ema = WeightEma.build(cfg.train.ema, self.unwrapped)  # a no-op unless train.ema.decay > 0
        self.checkpoints.attach(self.model, self.tokenizer, self.ema)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict:
        cfg, state, total = self.cfg, self.state, self.cfg.train.steps
        results_path = self.run_dir / "results.json"
        if state.step >= total and results_path.is_file():
            return self._already_finished(results_path)
        self._announce()
        self.stream = self._open_stream()
        self.model.train()
        if state.step < total and any_rank([preemption.requested()], self.accelerator.device)[0]:
            # signalled during start-up: nothing trained since the checkpoint resumed from (or none)
            self._stop_preempted("before its first step")
        self.window = TrainWindow()
        self.logger.start_progress(total, state.step)
        step_start = time.perf_counter()
        while state.step < total:
            step = state.step + 1
            self.hooks.on_step_start(self, step)
            fetched = [self._next_micro_batch() for _ in range(cfg.train.accum_steps)]
            teacher = self.distill.join([t for *_, t in fetched]) if self.distill else None
            grads = compute_gradients(
                self.model,
                [inputs for inputs, *_ in fetched],
                partial(self._loss, step, teacher),
                self.accelerator,
                grad_clip=cfg.optim.grad_clip,
                precision=cfg.train.precision,
            )
            # One all-reduce per step agrees on all three: skip this step? stop after it (a signal
            # arrived)? too many bad samples over all workers and ranks?
            flags = [float(not grads.finite), float(preemption.requested())]
            agreed = sum_over_ranks([*flags, *self.stream.totals()], self.accelerator.device)
            self.stream.check_skip_rate([int(v) for v in agreed[2:]])
            if agreed[0] > 0:
                self._skip(step, grads, [key for _, keys, _ in fetched for key in keys])
            else:
                self.guard.passed()
                apply_update(self.optimizer, self.scheduler, self.unwrapped)
                # not after a step the fp16 GradScaler skipped (inf gradients): the weights did not move
                self.ema.update(self.unwrapped, applied=not self.accelerator.optimizer_step_was_skipped)
                self.window.add(grads.loss)
            state.advance(self.global_batch)
            now = time.perf_counter()
            self.logger.advance(grads.loss, self.global_batch / (now - step_start))  # reads it only for a bar
            step_start = now
            self._periodic_work(step, grads)
            self.hooks.on_step_end(self, step)
            if step < total and agreed[1] > 0:
                if not due(step, cfg.train.ckpt_every, total):  # else just saved
                    self._save_checkpoint()
                self._stop_preempted("checkpointed")
        return self._finish(results_path)

    def _next_micro_batch(self) -> tuple[tuple, list[str], tuple | None]:
        """(images or None, tokens, cached image features or None) on the device, the keys, and
        the teacher's embeddings (distillation) or None."""
        batch = self.stream.next_batch(self.state.step, self.accelerator.device, self.normalize_images)
        self.window.data_wait += self.stream.take_wait()
        teacher = self.distill.embeddings(batch) if self.distill else None
        if self.feature_cache is None:
            return (batch.images, batch.tokens, None), batch.keys, teacher
        features = self.feature_cache.lookup(
            self.unwrapped, batch.images, batch.keys, self.accelerator.autocast
        )
        return (None, batch.tokens, features), batch.keys, teacher

    def _loss(self, step: int, teacher: tuple | None, *outputs) -> torch.Tensor:
        loss = self.loss_fn(*outputs) if teacher is None else self.distill.loss(*outputs, *teacher)
        return self.hooks.on_loss(step, loss)

    def _skip(self, step: int, grads: Gradients, keys: list[str]) -> None:
        """A step whose loss or gradient is not finite on some rank: no update, a "skip" record."""
        record = {
            "loss": grads.loss.item(),
            "grad_norm": float(grads.grad_norm),
            "consecutive": self.guard.consecutive + 1,
            "keys": keys[:64],
        }
        self.logger.log("skip", step, record)
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.skipped(step)  # raises after train.max_consecutive_skips in a row

    def _periodic_work(self, step: int, grads: Gradients) -> None:
        cfg, total = self.cfg, self.cfg.train.steps
        if due(step, cfg.train.log_every, total) and self.window.steps:
            self._log_train(step, grads)
            self.window = TrainWindow()
        if due(step, cfg.train.eval_every, total) and (cfg.eval.zeroshot or cfg.data.val_shards):
            self.eval_metrics = self.evaluate(step)
        if due(step, cfg.train.ckpt_every, total):
            self._save_checkpoint()
            if step < total:
                self.stream.new_segment(step)  # a new segment starts (see data_stream.py)

    def _log_train(self, step: int, grads: Gradients) -> None:
        window, model, accelerator = self.window, self.unwrapped, self.accelerator
        elapsed = time.perf_counter() - window.start
        rate = window.steps * self.global_batch / elapsed
        bias = {"logit_bias": model.logit_bias.item()} if model.logit_bias is not None else {}
        record = {
            "loss": accelerator.reduce(window.loss / window.steps, reduction="mean").item(),
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": model.logit_scale.exp().item(),
            **bias,
            "grad_norm": float(grads.grad_norm),
            "samples_per_s": rate,
            **self.flop_metrics(rate),
            **(self.distill.metrics() if self.distill else {}),
            "data_wait_frac": window.data_wait / elapsed,
            "samples_seen": self.state.samples_seen,
            **self.stream.metrics(partial(sum_over_ranks, device=accelerator.device)),
        }
        self.logger.log("train", step, record)

    def evaluate(self, step: int) -> dict:
        """Every rank encodes its share of the evaluation data and gets the same metrics; the main
        process writes the files and the log. The EMA of the weights (when on) is evaluated too, its
        metrics prefixed "ema/" and its files in eval/step-N/ema/."""
        out_dir = self.run_dir / "eval" / f"step-{step:09d}"
        metrics = self._evaluate_model(self.unwrapped, out_dir, self.run_dir.name)
        for prefix, model in self.ema.eval_models():
            other = self._evaluate_model(model, out_dir / prefix, f"{self.run_dir.name}-{prefix}")
            metrics.update({f"{prefix}/{key}": value for key, value in other.items()})
        self.logger.log("eval", step, metrics)
        self.last_eval_step = step
        return metrics

    def _evaluate_model(self, model, out_dir: Path, model_name: str) -> dict:
        cfg, device = self.cfg, self.accelerator.device
        return run_evaluation(
            model, self.tokenizer, self.eval_transform, cfg.eval, cfg.data.val_shards, device,
            cfg.train.precision, out_dir=out_dir, model_name=model_name, val_captions=cfg.data.captions,
        )  # fmt: skip

    def _save_checkpoint(self) -> None:
        self.checkpoints.save(self.state, self.stream.skip_guard.state())

    # ------------------------------------------------------------------ before and after the loop
    @property
    def start_model_dir(self) -> Path:
        """What WiSE-FT interpolates towards: the saved model when fine-tuning one (init_from), else
        the model as built at step 0, saved once so that a resumed run has it too."""
        return self.init_folder or self.run_dir / "start_model"

    def _announce(self) -> None:
        """The run's parameters, the WiSE-FT start model, and the "setup" record."""
        cfg, accelerator = self.cfg, self.accelerator
        if accelerator.is_main_process:
            params = sum(p.numel() for p in self.model.parameters())
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            accelerator.print(
                f"run_dir {self.run_dir}  params {params / 1e6:.2f}M ({trainable / 1e6:.2f}M trainable: "
                f"{trainable_summary(self.model)})"
            )
        if cfg.finetune.wise_alphas and self.init_folder is None and self.checkpoints.resume_from is None:
            self.checkpoints.export_model(self.start_model_dir)
            accelerator.wait_for_everyone()
        accum = cfg.train.accum_steps
        inexact = batch_statistics_layers(self.unwrapped) if accum > 1 else []
        if inexact and accelerator.is_main_process:
            print(
                f"warning: train.accum_steps={accum} with {len(inexact)} BatchNorm layers that train "
                f"({inexact[0]}, ...): each micro-batch is normalised on its own, so a step is not exactly "
                f"one batch of {self.global_batch}; lock the tower with frozen statistics, or use "
                "accum_steps=1",
                flush=True,
            )
        setup = {
            "loss_kind": cfg.loss.kind,
            "loss_impl": self.loss_fn.impl,
            "block_size": cfg.loss.block_size,
            "accum_steps": accum,
            "world_size": self.world,
            "contrastive_batch": self.global_batch,
            # layers that make accumulation differ from one big batch (see batch_statistics_layers)
            "accumulation_batchnorm_layers": len(inexact),
            **({"distill": cfg.distill.mode, "distill_weight": cfg.distill.weight} if self.distill else {}),
        }
        self.logger.log("setup", self.state.step, setup)

    def _open_stream(self) -> DataStream:
        cfg = self.cfg
        stream = DataStream(
            cfg.data,
            self.state.stream,
            seed=cfg.train.seed,
            segment_len=cfg.train.ckpt_every if cfg.train.ckpt_every > 0 else cfg.train.steps,
            rank=self.rank,
            world_size=self.world,
            transform=self.train_transform,
            tokenize=self.tokenizer,
            decode_size=cfg.model.image.image_size if cfg.data.fast_decode else None,
            skip_history=self.state.skip_history,
            teacher_members=cfg.distill.mode == "offline",
        )
        skipped = stream.start(self.state.step)
        if skipped is not None:
            self.accelerator.print(f"resumed inside a data segment: skipping {skipped} samples already used")
        return stream

    def _already_finished(self, results_path: Path) -> dict:
        """A finished run started again (e.g. quickstart re-run): report, do not redo or overwrite."""
        self.accelerator.print(f"{self.run_dir} already finished {self.state.step} steps")
        self.logger.close()
        self.accelerator.end_training()
        return {k: v for k, v in json.loads(results_path.read_text()).items() if isinstance(v, float)}

    def _finish(self, results_path: Path) -> dict:
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        if self.last_eval_step != state.step and (cfg.eval.zeroshot or cfg.data.val_shards):
            # resumed from the final checkpoint of a run killed before its final evaluation
            self.eval_metrics = self.evaluate(state.step)
        wise = None
        if cfg.finetune.wise_alphas:
            wise = run_wise_ft(
                self.unwrapped, self.start_model_dir, cfg, self.tokenizer, self.eval_transform, accelerator,
                self.run_dir,
            )  # fmt: skip
        self.checkpoints.export_model(self.run_dir / "model", with_ema=True)  # and model-ema/ when on
        if accelerator.is_main_process:
            summary = {"step": state.step, "samples_seen": state.samples_seen, **self.eval_metrics}
            if wise is not None:
                summary["wise"] = wise
            results_path.write_text(json.dumps(summary, indent=1))
            self.logger.log("summary", state.step, summary, console=False)
        self.logger.close()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return self.eval_metrics

    def _stop_preempted(self, what: str) -> None:
        """Record the stop and leave with Preempted (clip-train exits 75: requeue and resume)."""
        state = self.state
        self.logger.log(
            "preempted", state.step, {"samples_seen": state.samples_seen, "signal": preemption.signal_name()}
        )
        self.logger.close()
        self.accelerator.end_training()
        raise preemption.Preempted(
            f"stopped at step {state.step} after a preemption signal ({what}): run again to resume"
        )


def main(cfg: RunConfig, hooks: TrainHooks | None = None) -> dict:
    """Train the run cfg describes (resuming it when it has a checkpoint); its final metrics."""
    return Trainer(cfg, hooks).fit()
