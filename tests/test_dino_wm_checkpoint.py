"""DINO-WM checkpoints: safe loading, weight mapping, and the golden outputs of DINO-WM's own code."""

from __future__ import annotations

import os

import pytest
import torch
from tests_paths import FIXTURES

from wmlab.data import DatasetError
from wmlab.models.decoder import LatentDecoder
from wmlab.models.dino_wm_checkpoint import convert_dino_wm_run, load_pickled_checkpoint
from wmlab.models.world_model import LatentWorldModel

RUN = FIXTURES / "dino_wm" / "outputs" / "tiny_point_maze_a"
needs_fixture = pytest.mark.skipif(not RUN.is_dir(), reason=f"DINO-WM fixture run not found at {RUN}")


@pytest.fixture(scope="module")
def imported():
    converted = convert_dino_wm_run(RUN)
    model = LatentWorldModel(converted["config"])
    model.load_state_dict(converted["state"], strict=True)
    decoder = LatentDecoder(converted["decoder_config"])
    decoder.load_state_dict(converted["decoder_state"], strict=True)
    golden = torch.load(RUN / "golden.pt", weights_only=True)
    return converted, model.eval(), decoder.eval(), golden


@needs_fixture
def test_sizes_recovered_from_weights(imported):
    converted = imported[0]
    cfg = converted["config"]
    assert cfg.predictor["dim_head"] == 8  # not in hydra.yaml: from the qkv weight shape
    assert (cfg.num_visual_tokens, cfg.visual_dim, cfg.token_dim) == (4, 8, 12)
    assert (cfg.predictor["depth"], cfg.predictor["heads"], cfg.predictor["mlp_dim"]) == (2, 2, 16)
    assert (cfg.action_dim, cfg.action_emb_dim, cfg.proprio_emb_dim, cfg.num_hist) == (10, 2, 2, 3)
    assert converted["frameskip"] == 5


@needs_fixture
def test_reproduces_dino_wm_golden_outputs(imported):
    _, model, decoder, g = imported
    with torch.no_grad():
        z = model.embed(g["visual_latents"], g["proprio"], g["actions"][:, :3])
        torch.testing.assert_close(z, g["encoded_z"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.predict(z), g["predicted_z"], atol=1e-5, rtol=0)
        rollout = model.rollout(g["visual_latents"], g["proprio"], g["actions"])
        torch.testing.assert_close(rollout["z"], g["rollout_z"], atol=1e-5, rtol=0)
        torch.testing.assert_close(rollout["visual"], g["rollout_visual"], atol=1e-5, rtol=0)
        torch.testing.assert_close(rollout["proprio"], g["rollout_proprio"], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            decoder(g["visual_latents"][:, 0]), g["decoded_first_frame"], atol=1e-5, rtol=0
        )


@needs_fixture
def test_batched_rollout_equals_one_candidate_at_a_time(imported):
    _, model, _, g = imported
    candidates = torch.randn(2, 5, 7, 10)  # (B, S, n + t, A)
    with torch.no_grad():
        batched = model.rollout(g["visual_latents"], g["proprio"], candidates)["z"]  # (B, S, 8, N, D)
        for s in range(5):
            single = model.rollout(g["visual_latents"], g["proprio"], candidates[:, s])["z"]
            torch.testing.assert_close(batched[:, s], single, atol=1e-5, rtol=0)


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class UnknownModule(torch.nn.Module):
    pass


def test_code_running_checkpoint_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "model_latest.pth"
    torch.save({"epoch": 1, "predictor": Payload(sentinel)}, path)
    with pytest.raises(DatasetError, match="refusing to load"):
        load_pickled_checkpoint(path)
    assert not sentinel.exists()


def test_unknown_classes_are_refused(tmp_path):
    path = tmp_path / "model_latest.pth"
    torch.save({"epoch": 1, "predictor": UnknownModule()}, path)
    with pytest.raises(DatasetError, match="UnknownModule"):
        load_pickled_checkpoint(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hydra\.yaml"):
        convert_dino_wm_run(tmp_path)
    (tmp_path / "hydra.yaml").write_text("num_hist: 3\n")
    with pytest.raises(FileNotFoundError, match=r"model_latest\.pth"):
        convert_dino_wm_run(tmp_path)


# ------------------------------------------------------------------ issue 12 item 9: validated imports
def writable_copy(src, dst):
    """A copy of a (read-only) fixture run that the test may edit."""
    import shutil

    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


def set_first_float(ckpt, entry: str, value: float) -> None:
    """Overwrite the first float32 of tensor record ``entry`` (e.g. ``data/0``) inside a torch zip file.
    Records are stored uncompressed, so this is a real weight edit (what retraining or corruption does)."""
    import struct
    import zipfile

    data = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/" + entry))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the record's bytes follow its local header
    data[start : start + 4] = struct.pack("<f", value)
    ckpt.write_bytes(bytes(data))


def edit_hydra(run, **changes):
    import yaml

    hydra = yaml.safe_load((run / "hydra.yaml").read_text())
    for dotted, value in changes.items():
        node = hydra
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (run / "hydra.yaml").write_text(yaml.safe_dump(hydra))


@needs_fixture
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"predictor__heads": 3}, r"qkv weight has shape \(48, 12\).*heads=3"),  # 48 rows: 3 x 2 heads x 8
        ({"num_hist": 5}, r"position embedding has shape \(1, 12, 12\).*num_hist=5"),  # 12 = 3 frames x 4
    ],
)
def test_sizes_that_contradict_the_weights_fail_at_import(tmp_path, changes, message):
    """Regression: heads=3 used to import (dim_head = 48 // 9 = 5) and num_hist=5 gave 2 tokens per
    frame; both failed only later, in `plan`. Now the import refuses, naming the file."""
    from wmlab.models.dino_wm_checkpoint import import_dino_wm

    run = writable_copy(RUN, tmp_path / "run")
    edit_hydra(run, **changes)
    with pytest.raises(DatasetError, match=message) as err:
        import_dino_wm(run, tmp_path / "imported")
    assert "model_latest.pth" in str(err.value)
    assert not (tmp_path / "imported").exists()  # nothing half-written


@needs_fixture
def test_non_finite_weights_fail_at_import(tmp_path):
    from wmlab.models.dino_wm_checkpoint import import_dino_wm

    run = writable_copy(RUN, tmp_path / "run")
    set_first_float(run / "checkpoints" / "model_latest.pth", "data/0", float("nan"))  # the pos embedding
    with pytest.raises(
        DatasetError, match=r"model_latest\.pth: .*'predictor\.pos_embedding' has 1 non-finite"
    ):
        import_dino_wm(run, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()


def fake_checkpoint(tmp_path, monkeypatch, edit) -> object:
    """The fixture checkpoint re-saved through importable stand-ins of DINO-WM's classes, after
    ``edit(ckpt_dict)``: checkpoints of other shapes, as a different DINO-WM version might write."""
    import sys
    import types

    from wmlab.models.dino_wm_checkpoint import PickledObject

    classes = {}

    def cls_for(path):
        module, name = path.rsplit(".", 1)
        if module.startswith("torch."):
            import importlib

            return getattr(importlib.import_module(module), name)
        if path not in classes:
            parts = module.split(".")
            for i in range(len(parts)):
                mod = ".".join(parts[: i + 1])
                if mod not in sys.modules:
                    monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
            cls = type(name, (), {"__module__": module, "__qualname__": name})
            setattr(sys.modules[module], name, cls)
            classes[path] = cls
        return classes[path]

    def rebuild(obj):
        if isinstance(obj, PickledObject):
            cls = cls_for(obj._pickled_name)
            new = cls.__new__(cls)
            new.__dict__.update({k: rebuild(v) for k, v in obj.__dict__.items()})
            return new
        if isinstance(obj, dict):
            return type(obj)((k, rebuild(v)) for k, v in obj.items())
        if isinstance(obj, list | tuple):
            return type(obj)(rebuild(v) for v in obj)
        return obj

    ckpt = load_pickled_checkpoint(RUN / "checkpoints" / "model_latest.pth")
    ckpt = {k: rebuild(v) for k, v in ckpt.items() if not k.endswith("optimizer")}
    edit(ckpt)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "hydra.yaml").write_text((RUN / "hydra.yaml").read_text())
    torch.save(ckpt, run / "checkpoints" / "model_latest.pth")
    return run


def _drop(key):
    return lambda ckpt: ckpt.pop(key)


def _params_as_list(ckpt):
    ckpt["predictor"].__dict__["_parameters"] = [1, 2]


def _param_not_a_tensor(ckpt):
    ckpt["action_encoder"].__dict__["_modules"]["patch_embed"].__dict__["_parameters"]["weight"] = 3


def _no_layers(ckpt):
    ckpt["predictor"].__dict__["_modules"]["transformer"].__dict__["_modules"]["layers"].__dict__[
        "_modules"
    ] = {}


@needs_fixture
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("action_encoder"), r"the checkpoint has no 'action_encoder'"),  # was KeyError
        (_drop("proprio_encoder"), r"the checkpoint has no 'proprio_encoder'"),  # was KeyError
        (_params_as_list, r"'<root>' .* has _parameters of type list"),  # was AttributeError
        (_param_not_a_tensor, r"weight 'patch_embed\.weight' is a int, not a tensor"),  # was AttributeError
        (_no_layers, r"the predictor has no transformer layers"),  # was KeyError
    ],
)
def test_checkpoints_of_the_wrong_shape_are_one_line_errors(tmp_path, monkeypatch, edit, message):
    run = fake_checkpoint(tmp_path, monkeypatch, edit)
    with pytest.raises(DatasetError, match=message) as err:
        convert_dino_wm_run(run)
    assert str(run / "checkpoints" / "model_latest.pth") in str(err.value)
    assert "\n" not in str(err.value)


@needs_fixture
def test_the_restaged_fixture_still_converts(tmp_path, monkeypatch):
    """The stand-in re-save used above is faithful: unedited, it converts to the same weights."""
    run = fake_checkpoint(tmp_path, monkeypatch, lambda ckpt: None)
    a, b = convert_dino_wm_run(run)["state"], convert_dino_wm_run(RUN)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_fixture
def test_an_imported_decoder_loads_through_the_run_loader(imported, tmp_path):
    """Regression: `load_decoder` raised "decoder.json not found" on an imported run."""
    from wmlab.models.dino_wm_checkpoint import import_dino_wm
    from wmlab.train_decoder import load_decoder

    out = import_dino_wm(RUN, tmp_path / "imported")
    decoder = load_decoder(out)
    golden = imported[3]
    with torch.no_grad():
        torch.testing.assert_close(
            decoder(golden["visual_latents"][:, 0]), golden["decoded_first_frame"], atol=1e-5, rtol=0
        )


def test_allow_list_refusals_name_the_refused_global(tmp_path):
    path = tmp_path / "model_latest.pth"
    torch.save({"epoch": 1, "predictor": UnknownModule()}, path)
    with pytest.raises(DatasetError, match=r"refused global [\w.]*UnknownModule") as err:
        load_pickled_checkpoint(path)
    assert "truncated" not in str(err.value)
    torch.save({"epoch": 1, "predictor": Payload(tmp_path / "pwned")}, path)
    with pytest.raises(DatasetError, match=r"refused global (posix|os|nt)\.system"):
        load_pickled_checkpoint(path)


def test_invalid_hydra_yaml_is_an_error_naming_the_file(tmp_path):
    from wmlab.integrity import UserError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "hydra.yaml").write_text("predictor:\n  heads: [2\n")
    with pytest.raises(UserError, match=r"hydra\.yaml is not valid YAML .*line \d+") as err:
        convert_dino_wm_run(tmp_path)
    assert "<unicode string>" not in str(err.value)
    (tmp_path / "hydra.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UserError, match=r"hydra\.yaml holds a list, not a mapping"):
        convert_dino_wm_run(tmp_path)
