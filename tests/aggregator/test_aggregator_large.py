"""Models larger than one gRPC message cross in chunks and aggregate; the memory-saving paths
(blockwise folding, adopting the first update, streamed model files) give the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aggtest import StartFn
from fedstudy_aggregator import strategies
from fedstudy_aggregator.checkpoint import encode_model, write_model_file
from fedstudy_aggregator.strategies import FedAvg, fold_mean
from safetensors.numpy import load as st_load

from fedstudy.tensors import to_chunks
from fedstudy.wire import aggregator_pb2 as pb

# 6 MiB in one tensor: more than gRPC's default 4 MiB message limit, so it can only cross
# as several chunks.
BIG = 1_572_864


def big_model(value: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(value))
    return {
        "big": (rng.normal(size=BIG) + value).astype(np.float32),
        "bias": np.full(3, value, dtype=np.float32),
        "steps": np.array([int(value)], dtype=np.int64),
    }


def test_a_model_past_the_message_limit_crosses_in_chunks_and_aggregates(
    start: StartFn, tmp_path: Path
) -> None:
    init = big_model(0.0)
    assert init["big"].nbytes > 4 << 20
    assert len(list(to_chunks(init))) > 4
    agg = start()
    s0, s1 = agg.site("s0"), agg.site("s1")
    assert s0.join(init).accepted
    assert s1.join(init).accepted
    assert s0.task().kind == pb.TaskResponse.INIT
    assert s0.submit(init, 0).accepted
    assert agg.coord.version == 0
    assert np.array_equal(s0.download(0)["big"], init["big"])
    a, b = big_model(1.0), big_model(2.0)
    assert s0.task().kind == pb.TaskResponse.TRAIN
    assert s0.submit(a, 1, num_samples=100).accepted
    assert s1.task().kind == pb.TaskResponse.TRAIN
    assert s1.submit(b, 1, num_samples=300).accepted
    agg.wait_for(lambda st: st["completed_rounds"] == 1)
    got = s1.download(1)
    want = (a["big"].astype(np.float64) * 0.25 + b["big"].astype(np.float64) * 0.75).astype(
        np.float32
    )
    np.testing.assert_allclose(got["big"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["bias"], [1.75] * 3)
    assert got["steps"].tolist() == [2]
    # The checkpoint on disk holds the same model.
    saved = st_load((tmp_path / "state" / "model-000001.safetensors").read_bytes())
    assert np.array_equal(saved["model/big"], got["big"])


def test_blockwise_fold_equals_the_whole_array_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    mean = rng.normal(size=(7, 11)).astype(np.float32)
    x = rng.normal(size=(7, 11)).astype(np.float32)
    whole = mean.copy()
    fold_mean(whole, 2.0, x, 3.0)
    monkeypatch.setattr(strategies, "FOLD_BLOCK", 5)
    blocks = mean.copy()
    assert fold_mean(blocks, 2.0, x, 3.0) == 5.0
    assert np.array_equal(blocks, whole)


def test_an_owned_first_update_becomes_the_mean_and_others_are_copied() -> None:
    g = {"w": np.zeros(4, np.float32)}
    first = {"w": np.ones(4, np.float32)}
    caller = {"w": np.full(4, 3.0, np.float32)}
    s = FedAvg()
    s.begin_round(g)
    s.accept(first, 1, owned=True)
    s.accept(caller, 1)
    out = s.aggregate()
    assert out["w"] is first["w"]  # the first update's array, no copy of the model
    np.testing.assert_allclose(out["w"], [2.0] * 4)
    np.testing.assert_allclose(caller["w"], [3.0] * 4)  # an array not given away is untouched
    s.begin_round(out)
    kept = {"w": np.full(4, 5.0, np.float32)}
    s.accept(kept, 1)  # not owned: copied, then folded into the copy
    s.accept({"w": np.full(4, 7.0, np.float32)}, 1)
    np.testing.assert_allclose(s.aggregate()["w"], [6.0] * 4)
    np.testing.assert_allclose(kept["w"], [5.0] * 4)


def test_a_model_file_written_tensor_by_tensor_reads_as_the_whole_file_encoding(
    tmp_path: Path,
) -> None:
    model = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.array(3.5),
        "n": np.array([1, 2], dtype=np.int64),
        "empty": np.zeros((0, 3), np.float16),
        "flag": np.array([True, False]),
    }
    state = {"m/w": np.ones((2, 3), np.float32)}
    write_model_file(tmp_path / "m.safetensors", model, state, {"version": "4"})
    streamed = st_load((tmp_path / "m.safetensors").read_bytes())
    whole = st_load(encode_model(model, state, {"version": "4"}))
    assert streamed.keys() == whole.keys()
    for k in whole:
        assert streamed[k].dtype == whole[k].dtype
        assert np.array_equal(streamed[k], whole[k])
