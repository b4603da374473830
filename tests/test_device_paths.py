"""The CPU-side halves of the GPU path, runnable here: the CPU-only tunings (models/cpu_tunings.py)
decide by device type and switch themselves off elsewhere (asked with a cuda or meta device, no GPU
needed), and a compiled model's text tower trims padding to a few widths so that caption lengths
cause no recompilation. The GPU halves are tests/test_cuda.py."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from clip_train.config import load_config
from clip_train.evaluate.encode import EvalContext, InferenceTowers, image_chunk_size
from clip_train.models import cpu_tunings, dropout
from clip_train.models.clip import ClipModel
from clip_train.models.dropout import MaskDropout
from clip_train.models.text_tower import COMPILED_LENGTH_MULTIPLE, POOLINGS, TextTower, build_text_tower
from clip_train.models.transforms import BatchNormalize

TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]
CONTEXT = 32  # wider than one bucket of 16, so that bucketing has something to decide
OTHER_DEVICES = [torch.device("cuda"), torch.device("cuda", 1), torch.device("meta")]


def _cfg(*overrides):
    return load_config(["configs/tiny.yaml"], [*TINY, f"model.text.context_length={CONTEXT}", *overrides])


@pytest.mark.parametrize("tuning", cpu_tunings.ALL_TUNINGS, ids=lambda tuning: tuning.__name__)
def test_each_cpu_tuning_is_on_for_the_cpu_and_off_for_every_other_device_type(tuning):
    assert tuning(torch.device("cpu"))
    others = [*OTHER_DEVICES, torch.device("mps"), torch.device("xpu")]  # device types, no hardware needed
    assert not [device for device in others if tuning(device)]


def test_the_tuned_sites_ask_cpu_tunings_and_nothing_else(monkeypatch):
    """With every tuning answering "off", the CPU takes the plain path at each site: one place decides."""
    for tuning in cpu_tunings.ALL_TUNINGS:
        monkeypatch.setattr(cpu_tunings, tuning.__name__, lambda device: False)
    cpu = torch.device("cpu")
    assert image_chunk_size(cpu) == 1 << 30
    torch.manual_seed(0)
    model = ClipModel(_cfg().model).eval()
    towers = InferenceTowers()
    assert (
        towers.get(model, torch.zeros(2, 3, 64, 64), EvalContext(cpu, "fp32", 4))
        == model.image_tower_features
    )
    normalize = BatchNormalize([0.5] * 3, [0.25] * 3, reuse=2)
    normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert normalize._buffers == [None, None]
    monkeypatch.setattr(dropout.torch, "rand", lambda *args, **kwargs: pytest.fail("MaskDropout drew a mask"))
    assert MaskDropout(0.5).train()(torch.ones(8, 8)).shape == (8, 8)


@pytest.mark.parametrize("device", OTHER_DEVICES, ids=str)
def test_the_traced_eval_tower_and_small_chunks_are_for_the_cpu_only(device):
    torch.manual_seed(0)
    model = ClipModel(_cfg().model).eval()
    towers = InferenceTowers()
    example = torch.empty(2, 3, 64, 64, device="meta")  # never touched: the decision comes first
    assert towers.get(model, example, EvalContext(device, "fp32", batch_size=4)) == model.image_tower_features
    assert len(towers._store) == 0  # nothing traced, nothing kept
    assert image_chunk_size(device) == 1 << 30  # auto: the whole batch in one call
    assert image_chunk_size(device, 32) == 32  # a configured chunk is the user's choice anywhere
    assert image_chunk_size(torch.device("cpu")) == 8


def test_batch_normalize_reuses_its_buffers_on_the_cpu_only():
    normalize = BatchNormalize([0.5] * 3, [0.25] * 3, reuse=2)
    for _ in range(3):
        out = normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="meta"))
        assert out.dtype == torch.float32 and out.device.type == "meta"
    assert normalize._buffers == [None, None]  # off the CPU every batch is allocated afresh
    on_cpu = BatchNormalize([0.5] * 3, [0.25] * 3, reuse=2)
    first = on_cpu(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    on_cpu(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert on_cpu(torch.zeros(2, 3, 4, 4, dtype=torch.uint8)).data_ptr() == first.data_ptr()


def test_mask_dropout_leaves_other_devices_to_torchs_dropout(monkeypatch):
    def no_rand(*args, **kwargs):
        raise AssertionError("MaskDropout drew its own mask")

    monkeypatch.setattr(dropout.torch, "rand", no_rand)
    drop = MaskDropout(0.5).train()
    out = drop(torch.ones(8, 8, device="meta"))  # torch's F.dropout, fused on a GPU
    assert out.device.type == "meta" and out.shape == (8, 8)
    with pytest.raises(AssertionError, match="drew its own mask"):
        drop(torch.ones(8, 8))  # the CPU path does draw one: the patch above is what is tested


# ------------------------------------------------------------------------------------------------
# The compiled text tower's widths


def _tower(pooling: str = "mean") -> TextTower:
    torch.manual_seed(0)
    return build_text_tower(_cfg(f"model.text.pooling={pooling}").model.text).eval()


def _tokens(longest: int, rows: int = 4, seed: int = 0) -> torch.Tensor:
    """Right-padded ids [rows, CONTEXT]: the first row `longest` tokens long, the others shorter."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(rows, CONTEXT, dtype=torch.long)  # the tiny vocab pads with id 0
    for row in range(rows):
        length = longest if row == 0 else int(torch.randint(1, longest + 1, (1,), generator=g))
        tokens[row, :length] = torch.randint(5, 700, (length,), generator=g)
    return tokens


def _widths_seen(tower: TextTower) -> list[int]:
    widths: list[int] = []
    tower.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    return widths


def test_compiling_a_model_buckets_its_text_widths_and_eager_models_keep_the_exact_trim():
    model = ClipModel(_cfg().model)
    assert model.text.length_multiple == 1
    model.compile(backend="aot_eager")  # lazy: nothing is traced before the first call
    towers = [m for m in model.modules() if isinstance(m, TextTower)]
    assert towers and all(t.length_multiple == COMPILED_LENGTH_MULTIPLE == 16 for t in towers)

    eager = _tower()
    widths = _widths_seen(eager)
    with torch.no_grad():
        for longest in range(3, 18):
            eager(_tokens(longest))
    assert widths == list(range(3, 18))  # the uncompiled path is unchanged: the longest caption


@pytest.mark.parametrize("pooling", POOLINGS)
def test_bucketed_widths_are_few_and_give_the_untrimmed_features(pooling):
    tower = _tower(pooling)
    widths = _widths_seen(tower)
    with torch.no_grad():
        for longest in range(3, 18):
            tokens = _tokens(longest, seed=longest)
            tower.length_multiple = COMPILED_LENGTH_MULTIPLE
            bucketed = tower(tokens)
            tower.length_multiple = CONTEXT  # one bucket as wide as the padding: no trim at all
            untrimmed = tower(tokens)
            assert widths[-1] == CONTEXT
            assert (bucketed - untrimmed).abs().max().item() <= 1e-6, (pooling, longest)
    assert sorted(set(widths[::2])) == [16, 32]  # lengths 3..16 -> 16, 17 -> 32 (the cap)


def _graphs_compiled_per_batch(length_multiple: int) -> list[int]:
    """Dynamo graphs compiled so far after each of 7 training steps of a compiled text tower, on
    batches whose longest captions are 3..16 tokens."""
    tower = _tower().train()
    tower.length_multiple = length_multiple
    tower.compile(backend="aot_eager")  # traces like inductor, generates no code: runs on any CPU
    torch._dynamo.reset()
    counters.clear()
    seen = []
    try:
        for longest in (3, 9, 5, 14, 7, 16, 11):
            tower(_tokens(longest, seed=longest)).sum().backward()
            seen.append(counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    return seen


def test_a_compiled_text_tower_is_not_recompiled_for_other_caption_lengths():
    bucketed = _graphs_compiled_per_batch(COMPILED_LENGTH_MULTIPLE)
    assert bucketed[0] > 0 and bucketed == [bucketed[0]] * len(bucketed)  # compiled once, at step 1
    exact = _graphs_compiled_per_batch(1)  # the check can fail: exact widths are new shapes
    assert exact[-1] > exact[0]


def test_an_all_padding_batch_keeps_one_column_or_one_bucket():
    tower = _tower()
    tower.length_multiple = COMPILED_LENGTH_MULTIPLE
    only_padding = torch.zeros(2, CONTEXT, dtype=torch.long)
    assert tower.trimmed_width(only_padding) == 16  # an all-padding batch keeps one column, bucketed
    tower.length_multiple = 1
    assert tower.trimmed_width(only_padding) == 1
    assert F.normalize(tower(only_padding), dim=-1).isfinite().all()
