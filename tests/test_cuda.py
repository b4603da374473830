"""The GPU path on one CUDA device: bf16 training and its resume, the tiled losses, exact
accumulation, torch.compile (inductor), FSDP2 through `accelerate launch`, and evaluation without the
CPU-only tunings. Every test is marked `cuda` and skipped without a GPU (tests/conftest.py); the
CPU-side halves of these checks run everywhere (tests/test_device_paths.py).

Runs on a GPU are compared with a tolerance measured on the spot: the uninterrupted run is trained
twice, and a resumed run must agree with it as closely as the two agree with each other (cuDNN and
atomics may reorder fp32 sums between processes; an exact GPU gives the CPU tests' 1e-6).

    python -m pytest -m cuda -q -rs            # on a GPU machine; here: collected and skipped
"""

import contextlib
import math
import os
import socket
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from runs import REPO, entry, losses, run_train, train_args
from safetensors.torch import load_file
from test_accumulation import TwoTowers, _batch, _grads, _micro_batches
from test_device_paths import CONTEXT, _tokens
from test_loss import REFERENCE, _embeddings

from clip_train.accumulation import accumulated_backward
from clip_train.config import load_config
from clip_train.evaluate.encode import EvalContext, InferenceTowers, encode_images, image_chunk_size
from clip_train.loss.contrastive import ContrastiveLoss
from clip_train.models import dropout
from clip_train.models.clip import ClipModel
from clip_train.models.dropout import MaskDropout
from clip_train.models.transforms import batch_normalizer, build_image_transforms
from clip_train.tracking import read_metrics

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
NO_DROPOUT = [  # dropout masks are drawn differently once compiled: without it both runs compute the same
    "model.text.hf_config.hidden_dropout_prob=0.0",
    "model.text.hf_config.attention_probs_dropout_prob=0.0",
]
TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_train(run_dir, tiny_data, *extra, env=None, faults=()) -> subprocess.CompletedProcess:
    """clip-train on the tiny data under launch/accelerate/fsdp.yaml (FSDP2), on one GPU."""
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "launch/accelerate/fsdp.yaml", "--num_processes", "1",
        "--main_process_port", str(_free_port()), *entry(faults),
    ]  # fmt: skip
    cmd = launch + train_args(run_dir, tiny_data, *extra)
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, cwd=REPO
    )


def _resumes_exactly(train, tmp_path, tiny_data, *extra) -> dict[int, float]:
    """`train` straight (twice) and killed after step 6, then resumed from the step-4 checkpoint:
    steps 5-8 give the straight run's losses. Returns the straight run's losses."""
    for name in ("straight", "again"):
        proc = train(tmp_path / name, tiny_data, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    killed = train(tmp_path / "resumed", tiny_data, *extra, faults=("--kill-at-step", "6"))
    assert killed.returncode != 0  # SIGKILL (-9 bare; a launcher reports its own failure code)
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "step-000000004"
    resumed = train(tmp_path / "resumed", tiny_data, *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    want, again, got = (losses(tmp_path / name) for name in ("straight", "again", "resumed"))
    assert sorted(want) == sorted(got) == list(range(1, 9))
    assert all(math.isfinite(v) for v in [*want.values(), *got.values()]), want
    assert not read_metrics(tmp_path / "straight", "skip")  # no step was skipped as non-finite
    noise = max(abs(again[s] - want[s]) for s in want)
    assert noise <= 1e-3, f"two identical GPU runs differ by {noise}"
    after = range(5, 9)
    assert [got[s] for s in after] == pytest.approx([want[s] for s in after], abs=max(1e-6, 10 * noise))
    return want


def _optimizer_state_devices(checkpoint) -> set[str]:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    return {v.device.type for entry in state.values() for v in entry.values() if v.dim() > 0}


def _plain_model():
    return ClipModel(load_config(["configs/tiny.yaml"], TINY).model)


# ------------------------------------------------------------------------------------------------
# Training runs


@pytest.mark.slow
def test_a_bf16_run_on_the_gpu_trains_finite_losses_and_resumes_exactly(tmp_path, tiny_data):
    _resumes_exactly(run_train, tmp_path, tiny_data, "train.precision=bf16")
    # it did run on the GPU: the optimizer's moments were saved from CUDA tensors
    assert _optimizer_state_devices(tmp_path / "resumed" / "checkpoints" / "step-000000008") == {"cuda"}
    evals = read_metrics(tmp_path / "resumed", "eval")
    assert evals and 0.0 <= evals[-1]["retrieval/text_retrieval_recall@1"] <= 1.0


@pytest.mark.slow
def test_fsdp2_through_accelerate_launch_resumes_exactly_and_saves_the_full_model(tmp_path, tiny_data):
    _resumes_exactly(fsdp_train, tmp_path, tiny_data, "train.precision=bf16")
    run_dir = tmp_path / "resumed"
    # accelerate's FSDP save path wrote the state (it names its files so): the run was FSDP
    assert list((run_dir / "checkpoints" / "step-000000008").glob("pytorch_model_fsdp*"))
    saved = ClipModel.from_pretrained(run_dir / "model")  # strict: every key, every shape
    plain = _plain_model()
    assert sum(p.numel() for p in saved.parameters()) == sum(p.numel() for p in plain.parameters())
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(v.isfinite().all() for v in weights.values())
    # the final checkpoint's public model was gathered from the same shards
    final = load_file(str(run_dir / "checkpoints" / "step-000000008" / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_wise_ft_under_fsdp_is_refused_in_one_line_before_training(tmp_path, tiny_data):
    proc = fsdp_train(tmp_path / "run", tiny_data, "finetune.wise_alphas=[0, 1]")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clip-train: error:")]
    refusal = "finetune.wise_alphas is not supported under FSDP: launch with DDP or drop the sweep"
    assert errors == [f"clip-train: error: {refusal}"], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_an_inductor_compiled_run_trains_like_eager_and_saves_a_plain_model(tmp_path, tiny_data):
    common = [*NO_DROPOUT, f"model.text.context_length={CONTEXT}"]
    settings = {
        "fp32": ["train.precision=fp32"],
        "eager": ["train.precision=bf16"],
        "compiled": ["train.precision=bf16", "train.compile=true"],  # inductor, the default backend
    }
    procs = {}
    for name, extra in settings.items():
        procs[name] = run_train(tmp_path / name, tiny_data, *common, *extra, env={"TORCH_LOGS": "recompiles"})
        assert procs[name].returncode == 0, procs[name].stderr[-3000:]
    fp32, eager, compiled = (losses(tmp_path / name) for name in settings)
    assert sorted(compiled) == sorted(eager) == list(range(1, 9))
    # Inductor keeps some bf16 intermediates in fp32, so the two bf16 runs part by rounding, which
    # training then amplifies; bf16 rounding itself is measured by the same run in fp32.
    rounding = max(abs(eager[s] - fp32[s]) for s in eager)
    apart = max(abs(compiled[s] - eager[s]) for s in eager)
    assert apart <= 3 * rounding + 1e-3, (apart, rounding)
    # dynamo logs each recompilation with the function's file; the text tower's must not be among them
    recompiled = [line for line in procs["compiled"].stderr.splitlines() if "Recompiling function" in line]
    assert not [line for line in recompiled if "text_tower.py" in line], recompiled
    for folder in (tmp_path / "compiled" / "model", tmp_path / "compiled" / "checkpoints" / "step-000000008"):
        assert not [k for k in load_file(str(folder / "model.safetensors")) if "_orig_mod" in k]
    model = ClipModel.from_pretrained(tmp_path / "compiled" / "model").to(CUDA).eval()  # uncompiled
    with torch.no_grad():
        assert model.encode_text(_tokens(9).to(CUDA)).isfinite().all()


# ------------------------------------------------------------------------------------------------
# torch.compile in process


def test_the_compiled_model_equals_eager_and_compiles_its_text_tower_once_for_all_caption_lengths():
    from torch._dynamo.utils import counters

    cfg = load_config(["configs/tiny.yaml"], [*TINY, *NO_DROPOUT, f"model.text.context_length={CONTEXT}"])
    torch.manual_seed(0)
    model = ClipModel(cfg.model).to(CUDA).train()
    eager = ClipModel(cfg.model).to(CUDA).train()
    eager.load_state_dict(model.state_dict())
    model.compile()  # inductor, as train.compile does
    loss_fn = ContrastiveLoss()
    images = torch.randn(8, 3, 64, 64, device=CUDA)
    torch._dynamo.reset()
    counters.clear()
    graphs, apart, rounding = [], [], []
    try:
        for longest in (3, 9, 5, 14, 7, 16, 11):  # no optimizer step: the same weights throughout
            tokens = _tokens(longest, rows=8, seed=longest).to(CUDA)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(*model(images, tokens))
                want = loss_fn(*eager(images, tokens))
            loss.backward()
            graphs.append(counters["stats"]["unique_graphs"])
            with torch.no_grad():
                fp32 = loss_fn(*eager(images, tokens))
            apart.append(abs(loss.item() - want.item()))
            rounding.append(abs(want.item() - fp32.item()))
    finally:
        torch._dynamo.reset()
    assert graphs[0] > 0 and graphs == [graphs[0]] * len(graphs), graphs  # no recompilation after step 1
    assert max(apart) <= 3 * max(rounding) + 1e-4, (apart, rounding)  # within bf16 rounding of eager


# ------------------------------------------------------------------------------------------------
# Losses and accumulation


def _cuda_loss_and_grads(fn, image, text, log_scale: float, bias: float | None, bf16_autocast: bool):
    """fn's value and gradients w.r.t. image, text, log-temperature and bias, all on the GPU; the
    temperature and bias are fp32 like the model's parameters; the backward outside autocast."""
    image = image.detach().to(CUDA).requires_grad_(True)
    text = text.detach().to(CUDA).requires_grad_(True)
    scale = torch.tensor(log_scale, device=CUDA, requires_grad=True)
    bias_t = torch.tensor(bias, device=CUDA, requires_grad=True) if bias is not None else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16_autocast else contextlib.nullcontext()
    with autocast:
        loss = fn(image, text, scale.exp(), bias_t)
    leaves = [image, text, scale] + ([bias_t] if bias_t is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    return loss.double().cpu(), [g.double().cpu() for g in grads]


@pytest.mark.parametrize("kind, bias", [("infonce", None), ("siglip", -10.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiled_losses_on_the_gpu_equal_the_dense_loss_and_its_gradients(kind, bias, dtype):
    image, text = _embeddings(1000, 128, seed=11, dtype=dtype)  # 1000 = 3 x 256 + 232: a ragged tile
    bf16 = dtype == torch.bfloat16
    args = (image, text, math.log(100.0), bias, bf16)  # the largest temperature: logits in [-100, 100]
    got, got_grads = _cuda_loss_and_grads(ContrastiveLoss(kind, "tiled", 256), *args)
    want, want_grads = _cuda_loss_and_grads(ContrastiveLoss(kind, "dense"), *args)
    # both score in fp32 whatever the input dtype: the values agree to fp32 rounding
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    scale = torch.tensor(math.log(100.0)).exp()  # the fp32 value the GPU runs used
    exact = REFERENCE[kind](image, text, scale, torch.tensor(bias) if bias is not None else None)
    assert want.item() == pytest.approx(exact.item(), rel=1e-5)  # fp32 on the GPU (no TF32 logits)
    for name, g, w in zip(["image", "text", "scale", "bias"], got_grads, want_grads):
        # embedding gradients come back in the embeddings' dtype: bf16 ones differ by an ulp or two
        rel = 2**-7 if bf16 and g.numel() > 1 else 2e-5 if g.numel() > 1 else 1e-4
        assert (g - w).abs().max().item() <= rel * w.abs().max().item() + 1e-6, f"{kind}: d{name} differs"


def _full_batch_backward(model, micro_batches, loss_fn, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The whole batch with the same dropout masks (test_accumulation's reference): each micro-batch
    forwarded once with autograd, in order, each in an autocast region of its own as the trainer
    runs them (one region would cast each weight once and sum its micro-batches' gradients in bf16);
    one loss, one backward outside autocast (a backward under it would cast its own ops too)."""
    outputs = []
    for micro_batch in micro_batches:
        with autocast():
            outputs.append(model(*micro_batch))
    image, text = torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
    loss = loss_fn(image, text, outputs[-1][2], outputs[-1][3])
    loss.backward()
    return loss


def _assert_close_grads(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        bound = rel * want[name].abs().max().item() + 1e-7
        assert (got[name] - want[name]).abs().max().item() <= bound, f"gradient of {name} differs"


@pytest.mark.parametrize("kind, impl", [("infonce", "local"), ("infonce", "tiled"), ("siglip", "tiled")])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_accumulation_with_dropout_on_the_gpu_equals_the_full_batch(kind, impl, bf16):
    images, tokens = (t.to(CUDA) for t in _batch(12, seed=1))
    loss_fn = ContrastiveLoss(kind, impl, block_size=5)
    model = TwoTowers(dropout=0.3, bias=kind == "siglip").to(CUDA)
    micro = _micro_batches(images, tokens, 4)
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext

    torch.manual_seed(123)  # seeds the GPU's generator too: the dropout masks are CUDA's
    want_loss = _full_batch_backward(model, micro, loss_fn, autocast)
    want, want_rng = _grads(model), torch.cuda.get_rng_state()
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    got_loss = accumulated_backward(model, micro, loss_fn, autocast=autocast)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    _assert_close_grads(_grads(model), want, rel=1e-3 if bf16 else 1e-5)
    assert torch.equal(torch.cuda.get_rng_state(), want_rng)  # the GPU's stream continues as if run once


def test_accumulation_of_a_clip_model_with_text_dropout_on_the_gpu_equals_the_full_batch():
    # a LayerNorm image tower: BatchNorm would normalise each micro-batch on its own (not exact)
    vit = ["model.image.name=test_vit", "model.image.image_size=160"]
    cfg = load_config(["configs/tiny.yaml"], [*TINY, *vit])
    torch.manual_seed(0)
    model = ClipModel(cfg.model).to(CUDA).train()  # BERT's dropout 0.1: CUDA masks, replayed
    images = torch.randn(12, 3, 160, 160, device=CUDA)
    tokens = torch.cat([_tokens(longest, rows=3, seed=longest) for longest in (4, 7, 9, 12)]).to(CUDA)
    micro = _micro_batches(images, tokens[:, : cfg.model.text.context_length], 4)
    loss_fn = ContrastiveLoss("infonce", "tiled", block_size=5)
    torch.manual_seed(7)
    want_loss = _full_batch_backward(model, micro, loss_fn)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    got_loss = accumulated_backward(model, micro, loss_fn)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    _assert_close_grads(_grads(model), want, rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Evaluation on the GPU: none of the CPU-only tunings


def test_evaluation_on_the_gpu_uses_the_eager_tower_whole_batches_and_fresh_buffers():
    from PIL import Image

    cfg = load_config(["configs/tiny.yaml"], TINY)
    torch.manual_seed(0)
    model = ClipModel(cfg.model).eval()
    _, transform = build_image_transforms(model.visual, cfg.model.image)
    pictures = [Image.new("RGB", (40, 30), (20 * i, 255 - 30 * i, 7 * i)) for i in range(20)]
    cpu_ctx = EvalContext(torch.device("cpu"), "fp32", batch_size=20)
    on_cpu = encode_images(model, pictures.__getitem__, 20, transform, cpu_ctx)
    model.to(CUDA)
    ctx = EvalContext(CUDA, "fp32", batch_size=20)  # eval.jit_image_tower and eval.image_chunk at defaults
    example = torch.zeros(2, 3, 64, 64, device=CUDA)
    assert InferenceTowers().get(model, example, ctx) == model.image_tower_features
    assert image_chunk_size(CUDA, ctx.image_chunk) >= 20
    calls = []
    original = model.visual.forward
    model.visual.forward = lambda x: calls.append((len(x), x.device.type)) or original(x)
    on_gpu = encode_images(model, pictures.__getitem__, 20, transform, ctx)
    assert calls == [(20, "cuda")]  # the eager tower on the whole batch: no trace, no chunks of 8
    # the same embeddings as the CPU's traced, chunked tower, to TF32 convolutions' rounding
    assert F.cosine_similarity(on_gpu, on_cpu).min().item() > 0.999

    normalize = batch_normalizer(model.visual, cfg.model.image, reuse=2)
    batch = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    outputs = [normalize(batch.to(CUDA)) for _ in range(3)]
    assert normalize._buffers == [None, None]  # the CPU's reused buffers: not on a GPU
    assert len({out.data_ptr() for out in outputs}) == 3
    cpu_result = batch_normalizer(model.visual, cfg.model.image)(batch)
    assert torch.allclose(outputs[2].cpu(), cpu_result, atol=1e-5)


def test_mask_dropout_on_the_gpu_is_torchs_fused_dropout(monkeypatch):
    cfg = load_config(["configs/tiny.yaml"], TINY)
    model = ClipModel(cfg.model).to(CUDA).train()
    masks = [m for m in model.modules() if isinstance(m, MaskDropout)]
    assert masks  # swapped in at build time, whatever the device
    monkeypatch.setattr(dropout.torch, "rand", lambda *a, **k: pytest.fail("MaskDropout drew a CPU mask"))
    x = torch.randn(64, 256, device=CUDA)
    torch.manual_seed(5)
    got = masks[0](x)
    torch.manual_seed(5)
    want = F.dropout(x, masks[0].p, training=True)
    assert got.device.type == "cuda" and torch.equal(got, want)  # the same kernel, the same mask
    with torch.no_grad():
        model.encode_text(_tokens(9, rows=8).to(CUDA))  # the whole text tower, no CPU mask drawn
