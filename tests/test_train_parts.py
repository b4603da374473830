"""Pieces of the trainer tested without a training run."""

import contextlib

import pytest
import torch

from clip_train.config import ConfigError, load_config, validate
from clip_train.models.clip import ClipModel
from clip_train.train.data_stream import segment_seed
from clip_train.train.feature_cache import ImageFeatureCache
from clip_train.train.state import StreamState, TrainState
from clip_train.train.trainer import due

TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]


def test_due_gates_every_k_steps_and_always_the_last():
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]


def test_segment_seeds_differ_by_segment_and_pass_and_are_stable():
    seeds = {segment_seed(0, seg, p) for seg in range(5) for p in range(3)}
    assert len(seeds) == 15
    assert segment_seed(3, 2, 1) == segment_seed(3, 2, 1)


def _load(*overrides):
    return load_config(["configs/tiny.yaml"], TINY + list(overrides))


def test_feature_cache_needs_a_fully_locked_image_tower():
    with pytest.raises(ConfigError, match="model.image.lock=true"):
        _load("train.cache_image_features=true")
    with pytest.raises(ConfigError, match="unlocked_groups=0"):
        _load("train.cache_image_features=true", "model.image.lock=true", "model.image.unlocked_groups=1")
    cfg = _load("train.cache_image_features=true", "model.image.lock=true")
    cfg.model.image.freeze_bn_stats = False  # validate() holds the same rule for code that builds a config
    with pytest.raises(ConfigError, match="freeze_bn_stats=true"):
        validate(cfg)


def test_concat_entries_of_a_new_run_need_weights():
    with pytest.raises(
        ConfigError, match="entry test_resnet has no weights: write it as test_resnet=WEIGHTS"
    ):
        _load('model.image.concat=["test_resnet"]')
    _load('model.image.concat=["test_resnet"]', "model.init_from=/a/saved/model")  # a saved model's names


def test_wise_ft_without_evaluation_tasks_is_refused_before_training():
    with pytest.raises(ConfigError, match="needs evaluation tasks"):
        _load("finetune.wise_alphas=[0, 1]", "eval.zeroshot=[]")
    _load("finetune.wise_alphas=[0, 1]", "eval.zeroshot=[]", "data.val_shards=/data/val.tar")


def test_feature_cache_returns_the_towers_output_and_computes_each_sample_once():
    cfg = load_config(["configs/tiny.yaml"], TINY + ["model.image.lock=true"])
    torch.manual_seed(0)
    model = ClipModel(cfg.model).train()  # train mode: the locked tower must still be deterministic
    calls = []
    original = model.image_tower_features
    model.image_tower_features = lambda x: calls.append(len(x)) or original(x)
    cache = ImageFeatureCache(chunk=3)
    images = torch.randn(4, 3, 64, 64)
    first = cache.lookup(model, images, ["a", "b", "c", "d"], contextlib.nullcontext)
    with torch.no_grad():
        assert torch.allclose(first, original(images), atol=1e-6)
    # b and d again (in another order) plus one new sample: only the new one is computed
    again = cache.lookup(model, images[[3, 1, 0]], ["d", "b", "e"], contextlib.nullcontext)
    assert calls == [3, 1, 1]  # the 4 new samples in chunks of at most 3, then the 1 new one
    assert torch.equal(again[0], first[3]) and torch.equal(again[1], first[1])
    # cached features enter the model exactly as the tower's own output would
    tokens = torch.randint(1, 50, (4, 16))
    with torch.no_grad():
        direct = model(images, tokens)[0]
        via_cache = model(None, tokens, image_features=first)[0]
    assert torch.allclose(direct, via_cache, atol=1e-6)


def test_train_state_keeps_each_ranks_data_stream_and_reads_older_checkpoints():
    saved = TrainState(step=7, samples_seen=56, rank=0)
    saved.data_by_rank = {0: {"pass": 1, "positions": {0: 30}, "next_worker": 1},
                          1: {"pass": 0, "positions": {0: 31, 1: 29}, "next_worker": 0}}  # fmt: skip
    state = saved.state_dict()
    ranks = [TrainState(rank=r) for r in (0, 1, 2)]
    for train_state in ranks:
        train_state.load_state_dict(state)
    assert [(t.step, t.stream.data_pass, t.stream.positions, t.stream.next_worker) for t in ranks] == [
        (7, 1, {0: 30}, 1),
        (7, 0, {0: 31, 1: 29}, 0),
        (7, 0, {}, 0),  # no entry (more processes than saved): the segment's stream from its start
    ]
    # the format before per-rank state: one stream state, taken by every rank as it used to be
    legacy = {
        "step": 3,
        "samples_seen": 24,
        "data_pass": 2,
        "data_positions": {"1": 12},
        "data_next_worker": 1,
    }
    old = TrainState(rank=1)
    old.load_state_dict(legacy)
    assert (old.step, old.stream.data_pass, old.stream.positions, old.stream.next_worker) == (
        3,
        2,
        {1: 12},
        1,
    )


def test_stream_state_advances_by_worker_and_resets_for_a_segment_or_a_pass():
    stream = StreamState()
    stream.advance([(0, 4), (0, 7), (0, 6)], num_workers=2)  # a batch of worker 0's raw samples 4..7
    stream.advance([(1, 5)], num_workers=2)
    assert (stream.positions, stream.next_worker) == ({0: 7, 1: 5}, 0)  # the workers take turns
    stream.next_pass()
    assert (stream.data_pass, stream.positions, stream.next_worker) == (1, {}, 0)
    stream.advance([(1, 3)], num_workers=2)
    stream.reset()
    assert (stream.data_pass, stream.positions, stream.next_worker) == (0, {}, 0)
