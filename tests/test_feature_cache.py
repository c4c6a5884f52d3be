"""The frozen-feature cache: tokens equal the encoder's, windows match, resume, stale caches refused."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

import wmlab.encoders
from wmlab.data.errors import DatasetError
from wmlab.data.feature_cache import (
    FeatureCache,
    cache_path,
    encode_dataset,
    list_feature_caches,
    open_feature_cache,
)
from wmlab.data.store import TrajectoryStore
from wmlab.data.windows import WindowSpec, make_datasets
from wmlab.encoders import make_encoder

PIXELS = dict(input_size=32, patch_size=8)
VIT = dict(input_size=32, patch_size=8, depth=1, dim=32, heads=2)
ENCODERS = {"pixels": PIXELS, "random_vit": VIT}


def copy_store(store, parent) -> TrajectoryStore:
    """A private copy of ``store`` (same folder name, hence same fingerprint), without caches."""
    dst = parent / store.path.name
    shutil.copytree(store.path, dst, ignore=shutil.ignore_patterns("features"))
    return TrajectoryStore(dst)


def counting(monkeypatch, fail_on_call: int | None = None, error=RuntimeError) -> list[int]:
    """Make encode_dataset's encoders record batch sizes (and raise ``error`` on call ``fail_on_call``)."""
    calls: list[int] = []

    def make(*args, **kwargs):
        encoder = make_encoder(*args, **kwargs)  # the real one, even when patched twice
        encode = encoder.encode

        def wrapped(images):
            if fail_on_call is not None and len(calls) + 1 == fail_on_call:
                raise error("simulated crash")
            calls.append(len(images))
            return encode(images)

        encoder.encode = wrapped
        return encoder

    monkeypatch.setattr(wmlab.encoders, "make_encoder", make)
    return calls


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return copy_store(tiny_store, tmp_path_factory.mktemp("cached"))


@pytest.fixture(scope="module")
def caches(store):
    # Batches of 16 straddle the 30-step episodes, so episode boundaries inside a batch are covered.
    return {
        name: encode_dataset(store, name, encoder_kwargs=kwargs, batch_size=16, progress=False)
        for name, kwargs in ENCODERS.items()
    }


@pytest.mark.parametrize("name", list(ENCODERS))
def test_tokens_equal_direct_encoding(store, caches, name):
    cache = caches[name]
    encoder = make_encoder(name, **ENCODERS[name])
    assert cache.info.cache_key() == encoder.info.cache_key()
    assert np.array_equal(cache.lengths, store.lengths)
    for episode in store.committed:
        with torch.no_grad():
            direct = encoder.encode(store.frames(episode)).numpy()  # (L, N, D) float32
        cached = cache.episode(episode)
        assert cached.dtype == np.float16 and cached.shape == direct.shape
        np.testing.assert_allclose(cached.astype(np.float32), direct, rtol=1e-3, atol=1e-3)


def test_layout_and_metadata(store, caches):
    cache = caches["random_vit"]
    info = make_encoder("random_vit", **VIT).info
    assert cache.path == store.path / "features" / info.cache_key() == cache_path(store.path, info)
    assert list_feature_caches(store.path) == sorted(c.path for c in caches.values())
    E, T = store.n_slots, store.max_len
    assert cache.tokens.shape == (E, T, 16, 32) and cache.tokens.dtype == np.float16
    assert cache.tokens.chunks == (1, 1, 16, 32) and cache.tokens.shards == (1, T, 16, 32)
    shard_files = sorted(p.name for p in (cache.path / "tokens").iterdir() if p.name != "zarr.json")
    assert shard_files == [f"c.{e}.0.0.0" for e in range(E)]  # one file per episode, flat keys
    meta = cache.metadata
    assert meta["encoder"]["weights_sha256"] == info.weights_sha256 and meta["encoder"]["grid"] == [4, 4]
    assert meta["dataset"]["fingerprint"] == store.fingerprint()
    assert meta["dataset"]["path"] == str(store.path.resolve())
    assert {"wmlab", "torch", "zarr"} <= set(meta["versions"]) and meta["created"]
    assert meta["last_run"]["frames"] == int(store.lengths.sum())
    assert cache.info == info
    # The dataset is still a clean Zarr hierarchy that opens as before.
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = dict(zarr.open_group(str(store.path), mode="r").members())
    assert {"frames", "lengths", "features"} <= set(members)
    assert TrajectoryStore(store.path).fingerprint() == store.fingerprint()


def test_fast_path_agrees_with_zarr(caches, tmp_path):
    cache = caches["random_vit"]
    times = np.array([29, 0, 7, 7, 12])
    for episode in cache.committed:
        whole = cache.tokens[episode]  # (T, N, D) through Zarr's API
        np.testing.assert_array_equal(cache.episode(episode), whole[: cache.lengths[episode]])
        out = np.empty((len(times), 16, 32), np.float16)
        assert cache.read(episode, times, out=out) is out
        np.testing.assert_array_equal(out, whole[times])
    # A shard written by Zarr reads back through the fast path.
    shutil.copytree(cache.path, tmp_path / "copy")
    copy = FeatureCache(tmp_path / "copy", mode="a")
    data = np.random.default_rng(0).standard_normal((30, 16, 32)).astype(np.float16)
    copy.tokens[2] = data
    np.testing.assert_array_equal(FeatureCache(tmp_path / "copy").episode(2), data)
    with pytest.raises(IndexError, match="outside episode"):
        cache.read(0, [30])
    with pytest.raises(PermissionError):
        cache.write_episode(0, data)


def test_windows_from_cache_match_frames_then_encode(store, caches):
    spec = WindowSpec(num_hist=3, num_pred=1, frameskip=5)
    encoder = make_encoder("random_vit", **VIT)
    from_frames, _, _ = make_datasets(store, spec)
    from_cache, _, _ = make_datasets(store, spec, source=caches["random_vit"])
    ids = np.arange(0, len(from_frames), 5)
    frames = from_frames.get_batch(ids)
    features = from_cache.get_batch(ids)
    B, F = len(ids), spec.num_frames
    with torch.no_grad():
        encoded = encoder.encode(frames["visual"].reshape(B * F, 32, 32, 3))  # (B*F, N, D)
    encoded = encoded.reshape(B, F, 16, 32).numpy()  # (B, F, N, D)
    assert features["visual"].shape == (B, F, 16, 32) and features["visual"].dtype == np.float16
    np.testing.assert_allclose(features["visual"].astype(np.float32), encoded, rtol=1e-3, atol=1e-3)
    for key in ("proprio", "actions", "state"):
        np.testing.assert_array_equal(features[key], frames[key])
    # The cache travels to DataLoader workers by path.
    clone = pickle.loads(pickle.dumps(caches["random_vit"]))
    np.testing.assert_array_equal(clone.read(1, [3, 4]), caches["random_vit"].read(1, [3, 4]))


def test_resume_encodes_only_the_rest(store, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    calls = counting(monkeypatch)
    first = encode_dataset(store, "pixels", encoder_kwargs=PIXELS, episodes=[0, 3], out=out, progress=False)
    assert first.committed.tolist() == [0, 3] and sum(calls) == 60
    with pytest.raises(DatasetError, match="not in feature cache"):
        first.read(1, [0])
    calls.clear()
    full = encode_dataset(store, "pixels", encoder_kwargs=PIXELS, out=out, progress=False)
    assert sum(calls) == 4 * 30  # only episodes 1, 2, 4, 5
    assert np.array_equal(full.lengths, store.lengths)
    calls.clear()
    encode_dataset(store, "pixels", encoder_kwargs=PIXELS, out=out, progress=False)
    assert calls == []


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RuntimeError, "simulated crash"),
        (KeyboardInterrupt, "1 of 6 episodes are in .* run the same command"),
    ],
)
def test_interrupted_run_keeps_finished_episodes(store, tmp_path, monkeypatch, error, message):
    out = tmp_path / "cache"
    # Batches of 20: [ep0 0:20], [ep0 20:30 + ep1 0:10], then a crash with ep1 in flight.
    counting(monkeypatch, fail_on_call=3, error=error)
    with pytest.raises(error, match=message):
        encode_dataset(store, "pixels", encoder_kwargs=PIXELS, batch_size=20, out=out, progress=False)
    partial = FeatureCache(out)
    assert partial.committed.tolist() == [0]
    assert not list((out / "tokens").glob(".*partial"))
    calls = counting(monkeypatch)
    done = encode_dataset(store, "pixels", encoder_kwargs=PIXELS, batch_size=20, out=out, progress=False)
    assert sum(calls) == 5 * 30 and np.array_equal(done.lengths, store.lengths)
    direct = make_encoder("pixels", **PIXELS).encode(store.frames(1)).numpy()
    np.testing.assert_allclose(done.episode(1).astype(np.float32), direct, atol=1e-3)


def test_changed_dataset_is_refused(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    cache = encode_dataset(store, "pixels", encoder_kwargs=PIXELS, progress=False)
    info = cache.info
    assert open_feature_cache(store.path, info).path == cache.path
    # Commit one more episode: the cache no longer covers the dataset.
    writable = TrajectoryStore(store.path, mode="a")
    writable.grow(7)
    writable.write_episode(6, store.frames(0), store.actions(0), store.states(0))
    writable.commit({6: 30})
    for attempt in (
        lambda: encode_dataset(store.path, "pixels", encoder_kwargs=PIXELS, progress=False),
        lambda: open_feature_cache(store.path, info),
        lambda: FeatureCache(cache.path).check_matches(store.path),
    ):
        with pytest.raises(DatasetError) as err:
            attempt()
        message = str(err.value)
        assert "dataset changed" in message and "6 complete episodes in 6 slots then, 7 in 7 now" in message
        assert f"delete {cache.path}" in message and "wmlab encode" in message


def test_other_encoder_is_refused(store, caches, tmp_path):
    out = tmp_path / "cache"
    encode_dataset(store, "pixels", encoder_kwargs=PIXELS, out=out, progress=False)
    with pytest.raises(DatasetError, match=r"token_pool: the cache has 1, the encoder has 2") as err:
        encode_dataset(store, "pixels", encoder_kwargs=PIXELS, token_pool=2, out=out, progress=False)
    assert "num_tokens: the cache has 16, the encoder has 4" in str(err.value)
    # pixels has no weights; its patch size is part of the cache key, so both caches live side by side.
    patch4 = encode_dataset(store, "pixels", encoder_kwargs={**PIXELS, "patch_size": 4}, progress=False)
    assert patch4.path != caches["pixels"].path and patch4.info.num_tokens == 64
    other_seed = make_encoder("random_vit", seed=1, **VIT).info
    with pytest.raises(DatasetError, match="weights_sha256"):
        caches["random_vit"].check_matches(store, other_seed)


def test_missing_partial_and_foreign_caches(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    info = make_encoder("pixels", **PIXELS).info
    with pytest.raises(DatasetError, match=r"no feature cache of pixels-noweights-32px-pool1.*wmlab encode"):
        open_feature_cache(store, info)
    encode_dataset(store, "pixels", encoder_kwargs=PIXELS, episodes=[1], progress=False)
    with pytest.raises(DatasetError, match=r"lacks 5 of 6 episodes"):
        open_feature_cache(store, info)
    assert open_feature_cache(store, info, require_complete=False).committed.tolist() == [1]
    with pytest.raises(DatasetError, match="no feature cache"):
        FeatureCache(tmp_path / "nothing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    with pytest.raises(DatasetError, match="not a wmlab feature cache"):
        FeatureCache(tmp_path / "foreign")
    with pytest.raises(DatasetError, match="not complete"):
        uncommitted = TrajectoryStore(store.path, mode="a")
        uncommitted.commit({5: 0})
        encode_dataset(store.path, "pixels", encoder_kwargs=PIXELS, episodes=[5], out=tmp_path / "x")


def test_failed_write_is_raised_and_redone(store, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real_write = FeatureCache.write_episode

    def flaky(self, episode, tokens):
        if episode == 2:
            raise OSError("disk full")
        real_write(self, episode, tokens)

    monkeypatch.setattr(FeatureCache, "write_episode", flaky)
    with pytest.raises(OSError, match="disk full"):
        encode_dataset(store, "pixels", encoder_kwargs=PIXELS, batch_size=30, out=out, progress=False)
    assert 2 not in FeatureCache(out).committed
    monkeypatch.setattr(FeatureCache, "write_episode", real_write)
    done = encode_dataset(store, "pixels", encoder_kwargs=PIXELS, out=out, progress=False)
    assert np.array_equal(done.lengths, store.lengths)
