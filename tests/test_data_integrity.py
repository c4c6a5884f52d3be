"""Data you can trust: torn creation, corrupt bytes, lost files, NaN, concurrent writers, typos.

Each test reproduces a failure of issue 12 (items 4-7, 10) on real files: SIGKILLs at chosen points
of a real ``collect`` subprocess, single-bit flips and truncations of real chunk files, deleted
shards and commit indexes, two processes writing one artefact at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from wmlab.data import DatasetError
from wmlab.data.collect import collect
from wmlab.data.store import StoreSpec, TrajectoryStore
from wmlab.integrity import LockHeld

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_episodes=3, episode_len=8, workers=1, seed=5, env_kwargs={"img_size": 16}, progress=False)


def make_store(path, n=3, T=6, size=8, seed=0) -> TrajectoryStore:
    """A store of ``n`` committed episodes of random frames (incompressible: every byte matters)."""
    store = TrajectoryStore.create(path, StoreSpec(n, T, (size, size, 3), 2, 4), {"env": "test"})
    rng = np.random.default_rng(seed)
    for i in range(n):
        store.write_episode(
            i,
            rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8),
            rng.normal(size=(T, 2)).astype(np.float32),
            rng.normal(size=(T, 4)).astype(np.float32),
        )
    store.commit({i: T for i in range(n)})
    return TrajectoryStore(path)


def flip_bit(path: Path, byte: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted collection every resumed one must equal."""
    return collect(tmp_path_factory.mktemp("ref") / "ref.zarr", **TINY)


def assert_same_collection(store: TrajectoryStore, reference: TrajectoryStore) -> None:
    assert store.lengths.tolist() == reference.lengths.tolist()
    assert store.seeds.tolist() == reference.seeds.tolist()
    for i in reference.committed:
        assert np.array_equal(store.states(i), reference.states(i)), i
        assert np.array_equal(store.frames(i), reference.frames(i)), i
    assert store.fingerprint() == reference.fingerprint()


# ------------------------------------------------------------------------ 4. torn creation
#: Kill points, injected by patching functions the collector calls (so the same test drives any
#: version of the code): SIGKILL on the n-th call of ``target``.
KILL_POINTS = {
    "while creating arrays": ("zarr.core.group.Group.create_array", 3),
    "before writing metadata": ("zarr.core.attributes.Attributes.update", 1),
    "before writing seeds": ("zarr.core.array.Array.__setitem__", 1),
    "after the first commit": ("wmlab.data.store.TrajectoryStore.commit", 2),
}


def _killed_collect(out: Path, target: str, nth: int) -> subprocess.Popen:
    module, _, attr = target.rpartition(".")
    module, _, owner = module.rpartition(".")
    code = f"""
        import importlib, os, signal
        owner = getattr(importlib.import_module({module!r}), {owner!r})
        real, calls = getattr(owner, {attr!r}), []
        def patched(*args, **kwargs):
            calls.append(1)
            if len(calls) == {nth}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        setattr(owner, {attr!r}, patched)
        from wmlab.data.collect import collect
        collect({str(out)!r}, **{TINY!r})
    """
    return subprocess.Popen(python(code), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killed_creation_resumes_or_starts_clean(tmp_path, reference):
    outs = {name: tmp_path / f"d{k}.zarr" for k, name in enumerate(KILL_POINTS)}
    procs = {name: _killed_collect(outs[name], *KILL_POINTS[name]) for name in KILL_POINTS}  # in parallel
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -9, f"{name}: not killed ({proc.returncode}): {err.decode()[-500:]}"
    for name, out in outs.items():
        resumed = collect(out, **TINY)  # the same command again
        assert_same_collection(resumed, reference)
        leftovers = [p.name for p in out.parent.glob(f".{out.name}.*.partial")]
        assert not leftovers, f"{name}: temp dirs of the dead writer left: {leftovers}"


def test_interrupted_grow_is_repaired(tmp_path):
    path = tmp_path / "d.zarr"
    make_store(path, n=3)
    writable = TrajectoryStore(path, mode="a")
    for name in ("frames", "actions", "states", "seeds", "digests", "lengths"):  # grow's order
        array = writable.arrays[name]
        array.resize((5, *array.shape[1:]))  # ... killed before it wrote the new slots of lengths
    store = TrajectoryStore(path)
    assert store.n_slots == 5 and store.lengths.tolist() == [6, 6, 6, 0, 0]


# ------------------------------------------------------------------------ 5. corrupt bytes
def test_every_bit_flip_in_a_frame_chunk_is_an_error(tmp_path):
    path = tmp_path / "d.zarr"
    store = make_store(path)
    shard = path / "frames" / "c.1.0.0.0.0"
    index = np.frombuffer(shard.read_bytes()[-(6 * 16 + 4) : -4], "<u8").reshape(6, 2)
    offset, nbytes = (int(v) for v in index[2])  # step 2's chunk: blosc header, payload, crc
    silent = []
    for byte in np.linspace(offset, offset + nbytes - 1, 24).astype(int):
        flip_bit(shard, byte, bit=int(byte) % 8)
        try:
            frames = TrajectoryStore(path).frames(1)
            silent.append(int(byte))  # read without error: a corrupt pixel went through
            del frames
        except DatasetError as err:
            assert "shard" in str(err) and "re-collect episode 1" in str(err)
        flip_bit(shard, byte, bit=int(byte) % 8)
    assert silent == [], f"bit flips at bytes {silent} of {shard} decoded silently"
    assert np.array_equal(TrajectoryStore(path).frames(1), store.frames(1))  # restored: reads again
    # Zarr itself verifies the same checksums (the store is still a valid Zarr v3 store).
    import zarr

    flip_bit(shard, offset + nbytes // 2)
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_group(str(path), mode="r")["frames"][1, 2]


def test_truncated_and_flipped_actions_and_commit_index_are_errors(tmp_path):
    path = tmp_path / "d.zarr"
    make_store(path)
    chunk = path / "actions" / "c.0.0.0"
    whole = chunk.read_bytes()
    chunk.write_bytes(whole[:-8])
    with pytest.raises(DatasetError, match=r"actions file .*c\.0\.0\.0 of episode 0 is corrupt"):
        TrajectoryStore(path).actions(0)
    with pytest.raises(DatasetError, match="re-collect episode 0"):
        TrajectoryStore(path).all_actions()
    chunk.write_bytes(whole)
    flip_bit(chunk, len(whole) // 2)
    with pytest.raises(DatasetError, match="corrupt"):
        TrajectoryStore(path).actions(0)
    chunk.write_bytes(whole)
    lengths = path / "lengths" / "c.0"
    good = lengths.read_bytes()
    flip_bit(lengths, 3)
    with pytest.raises(DatasetError, match=r"commit index .* is corrupt"):
        TrajectoryStore(path)
    lengths.write_bytes(good)
    assert len(TrajectoryStore(path)) == 3


def test_deleted_files_of_committed_episodes_are_errors(tmp_path):
    path = tmp_path / "d.zarr"
    make_store(path)
    (path / "frames" / "c.2.0.0.0.0").unlink()
    store = TrajectoryStore(path)
    with pytest.raises(
        DatasetError, match=r"frame shard .*c\.2\.0\.0\.0\.0 of committed episode 2 is missing"
    ):
        store.frames(2, [0])
    (path / "states" / "c.1.0.0").unlink()
    with pytest.raises(DatasetError, match=r"states file .* of committed episode 1 is missing"):
        TrajectoryStore(path).all_states()
    (path / "lengths" / "c.0").unlink()
    with pytest.raises(DatasetError, match=r"commit index .* is missing"):
        TrajectoryStore(path)  # never "an empty dataset"


def test_token_cache_bit_flips_and_lost_index_are_errors(tmp_path):
    from wmlab.data.feature_cache import encode_dataset, open_feature_cache

    store = make_store(tmp_path / "d.zarr", size=16)
    kwargs = dict(encoder_kwargs={"input_size": 16, "patch_size": 8}, progress=False)
    cache = encode_dataset(store, "pixels", **kwargs)
    shard = cache.path / "tokens" / "c.0.0.0.0"
    T = store.max_len
    index = np.frombuffer(shard.read_bytes()[-(T * 16 + 4) : -4], "<u8").reshape(T, 2)
    offset, nbytes = (int(v) for v in index[1])
    silent = []
    for byte in np.linspace(offset, offset + nbytes - 1, 16).astype(int):
        flip_bit(shard, byte, bit=3)
        try:
            open_feature_cache(store, cache.info).episode(0)
            silent.append(int(byte))
        except DatasetError as err:
            assert "token shard" in str(err) and "re-encode episode 0" in str(err)
        flip_bit(shard, byte, bit=3)
    assert silent == [], f"bit flips at bytes {silent} of {shard} decoded silently"
    (cache.path / "lengths" / "c.0").unlink()
    with pytest.raises(DatasetError, match=r"commit index .* is missing"):
        open_feature_cache(store, cache.info)


def test_old_layout_without_checksums_still_reads(tmp_path):
    """A format-1 store (no crc32c codecs, 0-filled lengths) reads as before and is marked."""
    import zarr
    from zarr.codecs import BloscCodec

    path = tmp_path / "old.zarr"
    group = zarr.open_group(str(path), mode="w-")
    keys = {"name": "default", "separator": "."}
    blosc = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")
    group.create_array(
        "frames", shape=(2, 4, 8, 8, 3), chunks=(1, 1, 8, 8, 3), shards=(1, 4, 8, 8, 3), dtype="uint8",
        compressors=[blosc], fill_value=0, chunk_key_encoding=keys,
    )  # fmt: skip
    for name, dim in (("actions", 2), ("states", 4)):
        group.create_array(
            name,
            shape=(2, 4, dim),
            chunks=(1, 4, dim),
            dtype="float32",
            fill_value=0.0,
            chunk_key_encoding=keys,
        )
    for name in ("seeds", "lengths"):
        group.create_array(
            name, shape=(2,), chunks=(2,), dtype="int64", fill_value=0, chunk_key_encoding=keys
        )
    group.attrs.update({"format": "wmlab-trajectories", "format_version": 1})
    old = TrajectoryStore(path, mode="a")
    assert len(old) == 0 and not old.checksummed
    frames = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    old.write_episode(1, frames, np.ones((4, 2), np.float32), np.ones((4, 4), np.float32))
    old.commit({1: 4})
    reader = TrajectoryStore(path)
    assert reader.committed.tolist() == [1] and np.array_equal(reader.frames(1), frames)
    assert np.array_equal(np.asarray(reader.arrays["frames"][1]), frames)  # Zarr agrees
    fingerprint = reader.fingerprint()
    (path / "lengths" / "c.0").unlink()  # 0-filled: only the files without an index give it away
    with pytest.raises(DatasetError, match=r"commit index .* is missing"):
        TrajectoryStore(path)
    assert isinstance(fingerprint, str) and len(fingerprint) == 16


# ------------------------------------------------------------------------ 6. non-finite data
def test_nan_in_data_is_named_at_load(tmp_path):
    from wmlab.data.normalization import NormalizationStats
    from wmlab.data.windows import WindowSpec, make_datasets

    path = tmp_path / "d.zarr"
    make_store(path, n=4, T=6)
    writable = TrajectoryStore(path, mode="a")
    actions = np.asarray(writable.arrays["actions"][2])
    actions[3, 1] = np.nan
    writable.arrays["actions"][2] = actions  # as a buggy writer or a bad conversion would
    store = TrajectoryStore(path)
    with pytest.raises(DatasetError, match=r"actions of episode 2 .* not finite .* from step 3"):
        store.all_actions()
    with pytest.raises(DatasetError, match=r"actions of episode 2 .* not finite"):
        store.actions(2)
    with pytest.raises(DatasetError, match="actions of episode 2"):
        make_datasets(store, WindowSpec(num_hist=1, num_pred=1, frameskip=1))
    padded = np.zeros((3, 5, 2), np.float32)
    padded[1, 4, 0] = np.inf
    with pytest.raises(DatasetError, match=r"actions of episode 7 are not finite .* at step 4"):
        NormalizationStats.compute(padded, np.zeros((3, 5, 4), np.float32), np.array([5, 5, 5]), [3, 7, 9])
    with pytest.raises(DatasetError, match="states of episode 0 being written are not finite"):
        writable.write_episode(0, np.zeros((6, 8, 8, 3), np.uint8), np.zeros((6, 2)), np.full((6, 4), np.nan))


def test_nan_in_dino_wm_states_is_refused(tmp_path):
    import torch

    from wmlab.data.dino_wm_format import DinoWMDataset, convert_dino_wm, export_dino_wm

    src = export_dino_wm(make_store(tmp_path / "d.zarr"), tmp_path / "dino", progress=False)
    states = torch.load(src / "states.pth")
    states[1, 2, 0] = float("nan")
    torch.save(states, src / "states.pth")
    with pytest.raises(DatasetError, match=r"states\.pth: episode 1 holds NaN or inf at step 2"):
        DinoWMDataset(src)
    with pytest.raises(DatasetError, match="episode 1 holds NaN"):
        convert_dino_wm(src, tmp_path / "conv.zarr", progress=False)
    assert not (tmp_path / "conv.zarr").exists()


# ------------------------------------------------------------------------ 7. writers
def test_two_concurrent_collectors_one_is_refused(tmp_path, reference):
    out = tmp_path / "d.zarr"
    code = f"from wmlab.data.collect import collect; collect({str(out)!r}, **{TINY!r})"
    procs = [subprocess.Popen(python(code), cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    if codes == [0, 0]:  # the second started after the first finished: then it resumed, doing nothing
        assert all("is being written" not in err for _, err in results)
    else:
        assert codes[0] == 0 and codes[1] != 0
        refused = next(err for rc, err in results if rc != 0)
        assert "LockHeld" in refused and "is being written by pid" in refused
    assert_same_collection(TrajectoryStore(out), reference)


def _hold_lock(target: Path, seconds: float) -> subprocess.Popen:
    code = f"""
        import time
        from wmlab.integrity import WriterLock
        with WriterLock({str(target)!r}, "test"):
            print("held", flush=True)
            time.sleep({seconds})
    """
    proc = subprocess.Popen(python(code), cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_dataset_or_cache_is_refused_then_waited_for(tmp_path, reference):
    from wmlab.data.feature_cache import cache_path, encode_dataset
    from wmlab.encoders import make_encoder

    out = tmp_path / "d.zarr"
    holder = _hold_lock(out, 1.5)
    with pytest.raises(LockHeld, match=f"dataset {out} is being written by pid {holder.pid}"):
        collect(out, **TINY)
    assert not out.exists()
    assert_same_collection(collect(out, **TINY, lock_wait=30), reference)  # waits for the holder
    holder.wait(timeout=30)
    kwargs = dict(encoder_kwargs={"input_size": 16, "patch_size": 8}, progress=False)
    path = cache_path(out, make_encoder("pixels", **kwargs["encoder_kwargs"]).info)
    holder = _hold_lock(path, 1.0)
    with pytest.raises(LockHeld, match="feature cache"):
        encode_dataset(out, "pixels", **kwargs)
    assert len(encode_dataset(out, "pixels", **kwargs, lock_wait=30)) == 3
    holder.wait(timeout=30)


def test_two_processes_rewriting_one_shard_never_show_a_torn_file(tmp_path):
    """Unique temp names: concurrent writers of one file never share a temp file (no rename errors)
    and a reader sees one whole version or the other, never a mix."""
    path = tmp_path / "d.zarr"
    make_store(path, n=1, T=6)
    TrajectoryStore(path, mode="a")._frame_files.write(0, np.full((6, 8, 8, 3), 50, np.uint8))
    writer = f"""
        import sys, time
        import numpy as np
        from wmlab.data.store import TrajectoryStore
        store = TrajectoryStore({str(path)!r}, mode="a")
        value = int(sys.argv[1])
        frames = np.full((6, 8, 8, 3), value, np.uint8)
        end = time.time() + 1.5
        n = 0
        while time.time() < end:
            store._frame_files.write(0, frames)
            n += 1
        print(n)
    """
    procs = [
        subprocess.Popen([*python(writer), str(v)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for v in (50, 200)
    ]
    reader = TrajectoryStore(path)
    reads, deadline = 0, time.time() + 1.5
    while time.time() < deadline:
        reader._frame_files._index_cache.clear()
        try:
            frames = reader.frames(0)
        except DatasetError as err:  # only a torn file could cause this
            pytest.fail(f"reader saw a torn shard: {err}")
        values = set(np.unique(frames).tolist())
        assert values in ({50}, {200}), f"a read mixed versions: {values}"  # one whole file each time
        reads += 1
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-800:]
        assert int(out) > 0
    assert reads > 0
    assert not list((path / "frames").glob("*.partial"))


def test_leftover_partials_of_dead_writers_are_cleaned(tmp_path, reference):
    out = tmp_path / "d.zarr"
    shutil.copytree(reference.path, out)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    junk = [
        out / "frames" / f".c.0.0.0.0.0.{pid}.ab12cd34.partial",  # ours (unique_tmp), writer dead
        out / "actions" / f"c.1.0.0.{'0' * 32}.partial",  # Zarr's own temp name
    ]
    for file in junk:
        file.write_bytes(b"half")
    (tmp_path / f".e.zarr.{pid}.00aa11bb.partial").mkdir()  # a creation killed before its rename
    collect(out, **TINY)  # the next write of this dataset
    assert not any(f.exists() for f in junk)
    collect(tmp_path / "e.zarr", **TINY)
    assert not (tmp_path / f".e.zarr.{pid}.00aa11bb.partial").exists()


# ------------------------------------------------------------------------ 10. hygiene
@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"policy": "randm"}, "unknown policy 'randm'; known policies: random"),
        ({"workers": 0}, "workers must be an integer >= 1, got 0"),
        ({"workers": -1}, "workers must be an integer >= 1"),
        ({"n_episodes": 0}, "n_episodes must be an integer >= 1"),
        ({"episode_len": 0}, "episode_len must be an integer >= 1"),
        ({"env_kwargs": {"img_sise": 16}}, "env point_maze does not accept options"),
    ],
)
def test_a_typo_leaves_nothing_behind(tmp_path, option, message):
    out = tmp_path / "d.zarr"
    with pytest.raises(DatasetError, match=message):
        collect(out, **{**TINY, **option})
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fingerprint_and_cache_cover_episode_content(tmp_path):
    from wmlab.data.feature_cache import encode_dataset, open_feature_cache

    path = tmp_path / "d.zarr"
    store = make_store(path, size=16)
    kwargs = dict(encoder_kwargs={"input_size": 16, "patch_size": 8}, token_pool=2, progress=False)
    cache = encode_dataset(store, "pixels", **kwargs)
    before = store.fingerprint()
    copy = tmp_path / "renamed.zarr"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns("features"))
    assert TrajectoryStore(copy).fingerprint() == before  # content, not the folder name
    writable = TrajectoryStore(path, mode="a")
    episode = store.episode(1)
    writable.write_episode(1, 255 - episode["frames"], episode["actions"], episode["states"])  # same length
    writable.commit({1: store.max_len})
    assert TrajectoryStore(path).fingerprint() != before
    with pytest.raises(DatasetError, match="dataset changed") as err:
        open_feature_cache(path, cache.info)
    command = str(err.value).split("re-run `")[1].split("`")[0]
    assert command.split() == [
        "wmlab", "encode", f"data={path}", "encoder=pixels", "encoder.token_pool=2",
        "encoder.input_size=16", "encoder.patch_size=8",
    ]  # fmt: skip


def test_encode_hint_uses_config_choices_and_overrides():
    from wmlab.data.feature_cache import encode_command
    from wmlab.encoders.base import EncoderInfo

    info = EncoderInfo(
        name="dinov2_patch+dino_wm_norm", num_tokens=196, dim=384, grid=(14, 14), input_size=196, token_pool=2
    )
    assert encode_command("d.zarr", info=info) == (
        "`wmlab encode data=d.zarr encoder=dinov2_patch encoder.token_pool=2 encoder.input_size=196 "
        "encoder.norm=dino_wm`"
    )


def test_a_cache_never_mixes_precisions(tmp_path):
    from wmlab.data.feature_cache import FeatureCache, encode_dataset

    store = make_store(tmp_path / "d.zarr", size=16)
    kwargs = dict(encoder_kwargs={"input_size": 16, "patch_size": 8}, progress=False)
    cache = encode_dataset(store, "pixels", episodes=[0], **kwargs)
    assert cache.metadata["precision"] == "fp32"
    FeatureCache(cache.path, mode="a").update_metadata(precision="bf16-autocast")  # as made on a GPU
    with pytest.raises(DatasetError, match="never mixes precisions"):
        encode_dataset(store, "pixels", **kwargs)
    assert FeatureCache(cache.path).committed.tolist() == [0]
    meta = json.loads((cache.path / "zarr.json").read_text())["attributes"]
    assert meta["encode_args"]["encoder"] == "pixels"


def test_every_bit_flip_in_normalization_json_is_refused_or_harmless(tmp_path):
    """A flipped digit still parses as a number: the file's own checksum must catch it."""
    from wmlab.data.normalization import NormalizationStats

    stats = NormalizationStats(
        np.array([0.1, -0.2], np.float32), np.array([1.3, 1.1], np.float32),
        np.array([0.5, -2.0], np.float32), np.array([3.0, 4.0], np.float32),
    )  # fmt: skip
    path = tmp_path / "normalization.json"
    stats.save(path)
    raw = path.read_bytes()
    outcomes = {"refused": 0, "same": 0}
    for i in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[i] ^= 1 << bit
            path.write_bytes(bytes(flipped))
            try:
                loaded = NormalizationStats.load(path)
            except DatasetError as err:
                assert str(path) in str(err)
                outcomes["refused"] += 1
                continue
            for name in stats.__dict__:  # loaded without error: must be the very same statistics
                np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
            outcomes["same"] += 1
    assert outcomes["refused"] > 0.99 * len(raw) * 8


def test_a_cache_without_its_root_metadata_is_an_error_not_a_silent_fallback(tmp_path):
    """Training with a damaged cache must not quietly encode on the fly (other speed, maybe other tokens)."""
    from wmlab.data.feature_cache import encode_dataset
    from wmlab.encoders import make_encoder
    from wmlab.runs import find_feature_cache

    store = make_store(tmp_path / "d.zarr", size=16)
    encoder = make_encoder("pixels", input_size=16, patch_size=8)
    assert find_feature_cache(store, encoder) is None  # never built: encode on the fly, as documented
    cache = encode_dataset(
        store, "pixels", encoder_kwargs={"input_size": 16, "patch_size": 8}, progress=False
    )
    assert find_feature_cache(store, encoder).path == cache.path
    (cache.path / "zarr.json").unlink()
    with pytest.raises(DatasetError, match=r"damaged \(its zarr.json is missing\).*wmlab encode"):
        find_feature_cache(store, encoder)


def test_only_our_own_temp_names_are_read_as_a_writer_pid():
    from wmlab.integrity import _partial_writer_pid, unique_tmp

    assert _partial_writer_pid(unique_tmp(Path("x/c.0.0")).name) == os.getpid()
    assert _partial_writer_pid(".zarr.json.4242.00aa11bb.partial") == 4242
    for zarr_temp in ("0.0.0." + "0" * 32 + ".partial", "zarr." + "1" * 32 + ".partial", "0.partial"):
        assert _partial_writer_pid(zarr_temp) is None  # Zarr's own: no pid, never "pid 0, alive"
    assert _partial_writer_pid(".x.0.00aa11bb.partial") is None


def test_lock_wait_is_a_cli_option_and_the_study_waits(tmp_path, capsys, monkeypatch):
    from wmlab.cli import main
    from wmlab.config import compose

    monkeypatch.setenv("WMLAB_HYDRA_DIR", str(tmp_path / "hydra"))
    out = tmp_path / "d.zarr"
    args = ["collect", f"out={out}", "n_episodes=2", "episode_len=8", "workers=1", "img_size=16",
            "progress=false", "preview=false"]  # fmt: skip
    holder = _hold_lock(out, 1.5)
    assert main(args) == 1
    assert f"being written by pid {holder.pid}" in capsys.readouterr().err
    assert main([*args, "lock_wait=30"]) == 0  # waits for the holder, then collects
    holder.wait(timeout=30)
    assert compose("encode", ["data=x"]).lock_wait == 0
    assert compose("study", []).lock_wait > 600  # cells of one array wait for the shared dataset/cache


def test_a_damaged_array_metadata_file_is_named_with_its_fix(tmp_path):
    """A flipped bit in an array's zarr.json once surfaced as json's bare 'Expecting value: line 7'."""
    from wmlab.data.feature_cache import FeatureCache, encode_dataset

    store = make_store(tmp_path / "d.zarr", size=16)
    cache = encode_dataset(
        store, "pixels", encoder_kwargs={"input_size": 16, "patch_size": 8}, progress=False
    )
    for meta, opener, fix in (
        (store.path / "actions" / "zarr.json", TrajectoryStore, "collect (or convert) it again"),
        (cache.path / "tokens" / "zarr.json", FeatureCache, "re-run `wmlab encode`"),
    ):
        good = meta.read_bytes()
        for damaged in (good[: len(good) // 2], good.replace(b'"shape"', b'"sha\xa2e"')):
            meta.write_bytes(damaged)
            with pytest.raises(DatasetError) as err:
                opener(meta.parent.parent)
            assert f"{meta} is damaged" in str(err.value) and fix in str(err.value)
        meta.write_bytes(good)
