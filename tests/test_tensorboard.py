"""TensorBoard event files of a run, read back with TensorBoard's own event reader."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from lbw.train import train
from lbw.train.tensorboard import EventWriter, eval_scalars, telemetry_histograms, train_scalars
from tests.train_helpers import read_jsonl, tiny_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(log_dir):
    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


def _scalars(acc, tag) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_scalars_and_histograms_of_a_line():
    line = {
        "kind": "train",
        "step": 3,
        "loss": 2.5,
        "perplexity": None,  # Overflowed: left out.
        "learning_rate": 1e-3,
        "tokens_per_s": 100.0,
        "step_time_s": 0.1,
        "nonfinite": 1,
        "telemetry": {
            "scale": 0.5,
            "regime": 2,
            "held": True,
            "grad_norm": None,
            "regime_name": "CONTROL",
            "tensor_update_norms": [0.1, 0.2, None],
            "tensor_param_norms": [1.0, 0.0, 2.0],
            "cluster_scales": {"b/kernel": [3.0, 4.0], "a/kernel": [1.0, 2.0]},
        },
    }
    assert train_scalars(line) == {
        "train/loss": 2.5,
        "train/learning_rate": 1e-3,
        "train/tokens_per_s": 100.0,
        "train/step_time_s": 0.1,
        "train/nonfinite": 1.0,
        "guard/scale": 0.5,
        "guard/regime": 2.0,
        "guard/held": 1.0,
    }
    hist = telemetry_histograms(line["telemetry"])
    assert sorted(hist) == [
        "guard/cluster_scales",
        "guard/tensor_param_norms",
        "guard/tensor_update_norms",
        "guard/tensor_update_ratio",
    ]
    np.testing.assert_array_equal(hist["guard/cluster_scales"], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(hist["guard/tensor_update_norms"], [0.1, 0.2])
    np.testing.assert_allclose(hist["guard/tensor_update_ratio"], [0.1])  # 0.2/0, None/2: out.
    assert eval_scalars({"eval_loss": 1.5, "eval_perplexity": math.exp(1.5)}) == {
        "eval/loss": 1.5,
        "eval/perplexity": pytest.approx(math.exp(1.5)),
    }


def test_a_resumed_session_replaces_the_later_steps(tmp_path):
    first = EventWriter(tmp_path)
    for step in (1, 2, 3, 4):
        first.train({"step": step, "loss": float(step)})
    first.close()
    second = EventWriter(tmp_path, purge_step=3)  # Resumed from the checkpoint of step 2.
    for step in (3, 4, 5):
        second.train({"step": step, "loss": 10.0 * step})
    second.close()
    assert _scalars(_read(tmp_path), "train/loss") == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0, 5: 50.0}


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_a_governed_run_writes_its_telemetry(tmp_path):
    config = tiny_config(tmp_path, optimizer="lbw", steps=4, eval_every=2)
    train(config)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    lines = {r["step"]: r for r in records if r["kind"] == "train"}
    acc = _read(tmp_path)
    tags = acc.Tags()
    loss = _scalars(acc, "train/loss")
    assert sorted(loss) == [1, 2, 3, 4]
    for step, value in loss.items():
        assert value == pytest.approx(lines[step]["loss"], rel=1e-6)
    for field in ("scale", "regime", "limited_tensors", "effective_scale", "update_ratio"):
        got = _scalars(acc, f"guard/{field}")
        assert got == {s: pytest.approx(lines[s]["telemetry"][field], rel=1e-6) for s in lines}
    assert sorted(_scalars(acc, "train/learning_rate")) == [1, 2, 3, 4]
    evals = {r["step"]: r["eval_loss"] for r in records if r["kind"] == "eval"}
    assert _scalars(acc, "eval/loss") == {s: pytest.approx(v, rel=1e-6) for s, v in evals.items()}
    assert {"guard/tensor_update_ratio", "guard/tensor_update_norms"} <= set(tags["histograms"])
    ratios = acc.Histograms("guard/tensor_update_ratio")
    assert [h.step for h in ratios] == [1, 2, 3, 4]
    nonzero = [n for n in lines[1]["telemetry"]["tensor_param_norms"] if n > 0]  # Zero biases.
    assert 0 < ratios[0].histogram_value.num == len(nonzero)

    # --overwrite replaces the event files (the same config: its step is compiled already).
    train(dataclasses.replace(config, overwrite=True))
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert sorted(_scalars(_read(tmp_path), "train/loss")) == [1, 2, 3, 4]
