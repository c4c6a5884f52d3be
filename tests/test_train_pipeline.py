"""The training input pipeline and precision as train() uses them: results do not depend on the number
of reader processes, training.compile trains the same model, precision=auto is measured and recorded."""

from __future__ import annotations

import json

import pytest
from tiny_configs import QUIET_CPU, TINY_MODEL, train_config

import wmlab.precision as precision_module
from wmlab.runs import load_tensors
from wmlab.train import train

TINY = [
    *TINY_MODEL,
    "predictor.dropout=0.1",  # dropout draws from the RNG: the streams must not depend on the readers
    "frameskip=2",
    "num_hist=2",
    "training.batch_size=8",
    "training.max_steps_per_epoch=3",
    "training.val_batches=1",
    "training.rollout_eval_steps=0",
    *QUIET_CPU,
]


def cfg_for(store, run_dir, *extra) -> dict:
    return train_config(TINY, store, run_dir, *extra)


def history_and_weights(run) -> tuple[list[float], dict]:
    meta = json.loads((run / "metadata.json").read_text())
    return [h["train_loss"] for h in meta["history"]], load_tensors(run / "model.safetensors")


def assert_same_run(a, b) -> None:
    (loss_a, weights_a), (loss_b, weights_b) = history_and_weights(a), history_and_weights(b)
    assert loss_a == loss_b
    for name, tensor in weights_a.items():
        assert tensor.equal(weights_b[name]), name


def test_reader_processes_change_nothing_but_speed(tiny_store, tmp_path):
    fixed = ("training.epochs=2", "training.precision=fp32")
    inline = train(cfg_for(tiny_store, tmp_path / "w0", "training.workers=0", *fixed))
    readers = train(cfg_for(tiny_store, tmp_path / "w2", "training.workers=2", "training.prefetch=2", *fixed))
    assert_same_run(inline, readers)  # bit for bit, dropout included
    meta = json.loads((readers / "metadata.json").read_text())
    assert meta["input"]["workers"] == 2 and meta["input"]["prefetch"] == 2
    assert json.loads((inline / "metadata.json").read_text())["input"]["workers"] == 0


def test_compile_trains_the_same_model(tiny_store, tmp_path):
    # The eager backend traces the model with TorchDynamo without generating code: the same numbers.
    fixed = ("training.epochs=1", "training.precision=fp32")
    plain = train(cfg_for(tiny_store, tmp_path / "plain", *fixed))
    compiled = train(cfg_for(tiny_store, tmp_path / "compiled", "training.compile=eager", *fixed))
    assert_same_run(plain, compiled)
    assert json.loads((compiled / "metadata.json").read_text())["input"]["compile"] == "eager"


def test_precision_auto_is_measured_recorded_and_kept_on_resume(tiny_store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    # This device measured with bf16 twice as fast: the fixed-window probe decides whether it is used.
    monkeypatch.setattr(
        precision_module, "measure_speed", lambda device, shapes, **kw: {"fp32": 1.0, "bf16": 0.5}
    )
    train(cfg_for(tiny_store, run, "training.epochs=1"))
    info = json.loads((run / "metadata.json").read_text())["precision"]
    assert info["requested"] == "auto" and info["speedup_over_fp32"] == {"bf16": 2.0}
    check = info["agreement"]["bf16"]
    assert check["candidates"] == 8 and check["start_states"] == 2  # 2 x 8 fixed training windows
    assert info["chosen"] == ("bf16" if check["agree"] else "fp32") and info["reason"]
    # Resumed on a device where bf16 now measures slow: the run keeps the precision it started with.
    monkeypatch.setattr(
        precision_module, "measure_speed", lambda device, shapes, **kw: {"fp32": 1.0, "bf16": 3.0}
    )
    train(cfg_for(tiny_store, run, "training.epochs=2"))
    assert json.loads((run / "metadata.json").read_text())["precision"] == info
    # A run started where bf16 is slow stays at fp32, with that evidence.
    other = train(cfg_for(tiny_store, tmp_path / "other", "training.epochs=1"))
    slow = json.loads((other / "metadata.json").read_text())["precision"]
    assert slow["chosen"] == "fp32" and "no lower precision" in slow["reason"] and slow["agreement"] == {}
    # Changing training.precision on resume re-decides (and is recorded as a config change).
    train(cfg_for(tiny_store, run, "training.epochs=3", "training.precision=fp32"))
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["precision"]["chosen"] == "fp32" and meta["precision"]["reason"] == "requested explicitly"
    assert "training.precision: 'auto' -> 'fp32'" in meta["config_changes"][-1]["changes"]


@pytest.mark.parametrize("value", ["fp16", "bf32"])
def test_an_unknown_precision_is_refused(tiny_store, tmp_path, value):
    from wmlab.integrity import UserError

    with pytest.raises(UserError, match=rf"training\.precision='{value}' is not valid"):
        train(cfg_for(tiny_store, tmp_path / "run", f"training.precision={value}"))
