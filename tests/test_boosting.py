"""XGBoost studies: the forest as tensors (against XGBoost's own predictions), and XGBoost's
federated mode between the aggregator's tracker and site workers over the study's mutual TLS
(equal trees at every site; a certificate from another CA refused with a clear error)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

xgb = pytest.importorskip("xgboost", reason="the boosting extra (xgboost) is not installed")

from fedstudy_aggregator.boosting import BoostingTracker  # noqa: E402
from fedstudy_trainer.boosting import (  # noqa: E402
    BASE_MARGIN,
    FEATURE,
    LEAF,
    UNUSED,
    VALUE,
    BoostingError,
    FederatedBooster,
    TrackerLink,
    booster_params,
    empty_forest,
    encode_booster,
    forest_margin,
    margin_metrics,
)

from fedstudy.boosting import default_tracker_address  # noqa: E402
from fedstudy.certs import init_ca_dir, issue_cert, read_credentials, write_credentials  # noqa: E402
from fedstudy.spec import Model  # noqa: E402
from fedstudy.tls import credential_files  # noqa: E402


def rows(n: int = 300, seed: int = 0, missing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = ((x[:, 0] + x[:, 1] * x[:, 2] + 0.3 * rng.normal(size=n)) > 0).astype(np.float32)
    if missing:
        x[rng.random(x.shape) < missing] = np.nan
    return x, y


def local_booster(x: np.ndarray, y: np.ndarray, depth: int, rounds: int) -> object:
    params = booster_params(Model(name="xgboost", maxDepth=depth, learningRate=0.3), 0)
    return xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=rounds)


@pytest.mark.parametrize("missing", [0.0, 0.2])
def test_the_forest_predicts_what_xgboost_predicts(missing: float) -> None:
    x, y = rows(missing=missing)
    booster = local_booster(x, y, depth=3, rounds=6)
    forest = encode_booster(json.loads(bytes(booster.save_raw("json"))), trees=8, depth=3)
    assert forest[FEATURE].shape == (8, 15)
    assert (forest[FEATURE][6:] == UNUSED).all()  # two slots for rounds not yet grown
    expected = booster.predict(xgb.DMatrix(x), output_margin=True)
    np.testing.assert_allclose(forest_margin(forest, x), expected, atol=1e-5)


def test_an_empty_forest_predicts_the_base_margin() -> None:
    forest = empty_forest(trees=3, depth=2)
    x, y = rows(10)
    np.testing.assert_array_equal(forest_margin(forest, x), np.zeros(10))
    metrics = margin_metrics(forest_margin(forest, x), y)
    assert metrics["loss"] == pytest.approx(np.log(2))
    assert metrics["auc"] == 0.5
    assert set(metrics) == {"loss", "accuracy", "auc", "auprc"}


def test_a_tree_deeper_than_the_forest_is_an_error() -> None:
    x, y = rows()
    booster = local_booster(x, y, depth=3, rounds=1)
    with pytest.raises(BoostingError, match="deeper than maxDepth 1"):
        encode_booster(json.loads(bytes(booster.save_raw("json"))), trees=1, depth=1)


def test_leaves_hold_the_learning_rate_scaled_values() -> None:
    x, y = rows()
    booster = local_booster(x, y, depth=1, rounds=1)
    forest = encode_booster(json.loads(bytes(booster.save_raw("json"))), trees=1, depth=1)
    assert forest[FEATURE][0, 0] >= 0
    assert list(forest[FEATURE][0, 1:]) == [LEAF, LEAF]
    assert forest[BASE_MARGIN][0] == 0.0  # base_score 0.5
    assert np.abs(forest[VALUE][0, 1:]).max() < 0.3 * 2  # eta times a weight below 2


def test_a_site_cannot_join_in_the_middle_of_a_study() -> None:
    x, y = rows(20)
    link = TrackerLink("127.0.0.1:1", world=2, rank=0, tls=None, timeout_s=1)
    booster = FederatedBooster(link, booster_params(Model(name="xgboost"), 0), x, y)
    with pytest.raises(BoostingError, match="this site holds 0 trees"):
        booster.train_round(3)


def test_the_default_tracker_is_beside_the_aggregator() -> None:
    assert default_tracker_address("agg.example.org:7700") == "agg.example.org:7701"
    assert default_tracker_address("[::1]:443") == "[::1]:7701"


# --- the federated mode, as processes ------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    import numpy as np
    from fedstudy.spec import Model
    from fedstudy.tls import credential_files
    from fedstudy_trainer.boosting import (
        BoostingError, FederatedBooster, TrackerLink, booster_params, encode_booster)
    address, rank, tls_dir, name, timeout = sys.argv[1:6]
    rng = np.random.default_rng(int(rank))
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(np.float32)
    link = TrackerLink(address, 2, int(rank), credential_files(Path(tls_dir), name), int(timeout))
    booster = FederatedBooster(link, booster_params(Model(name="xgboost", maxDepth=2), 0), x, y)
    try:
        for r in (1, 2, 3):
            forest = encode_booster(booster.train_round(r), 3, 2)
        booster.close()
    except BoostingError as e:
        print("error:", e)
        sys.exit(1)
    print("forest:", hashlib.sha256(b"".join(a.tobytes() for a in forest.values())).hexdigest())
    """
)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The study's CA, the aggregator's and two sites' certificates; and site b's again,
    from another CA (``rogue-b``)."""
    root = tmp_path_factory.mktemp("tls")
    init_ca_dir("boosting", root / "ca", days=1, force=True)
    init_ca_dir("other", root / "other-ca", days=1, force=True)
    ca, other = read_credentials(root / "ca", "ca"), read_credentials(root / "other-ca", "ca")
    for folder, name, issuer, server in [
        ("aggregator", "aggregator", ca, True),
        ("a", "a", ca, False),
        ("b", "b", ca, False),
        ("rogue-b", "b", other, False),
    ]:
        hosts = ["127.0.0.1"] if server else None
        creds = issue_cert(name, issuer.cert, issuer.key, server=server, hosts=hosts, days=1)
        write_credentials(creds, root / folder, name)
    return root


def run_workers(
    tmp_path: Path, certificates: Path, folders: list[str], timeout: int
) -> list[subprocess.CompletedProcess[str]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tracker = BoostingTracker(
        2,
        0,
        credential_files(certificates / "aggregator", "aggregator"),
        logging.getLogger("test-boosting"),
        timeout_s=timeout,
    )
    port = tracker.start()
    try:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    f"127.0.0.1:{port}",
                    str(rank),
                    str(certificates / folder),
                    "ab"[rank],
                    str(timeout),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for rank, folder in enumerate(folders)
        ]
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=timeout + 120)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
        return results
    finally:
        tracker.stop()


@pytest.mark.slow
def test_every_site_grows_the_same_trees_over_mutual_tls(
    tmp_path: Path, certificates: Path
) -> None:
    results = run_workers(tmp_path, certificates, ["a", "b"], timeout=60)
    for r in results:
        assert r.returncode == 0, r.stdout
    forests = {r.stdout.strip() for r in results}
    assert len(forests) == 1
    assert forests.pop().startswith("forest:")


@pytest.mark.slow
def test_a_site_certificate_from_another_ca_is_refused(tmp_path: Path, certificates: Path) -> None:
    results = run_workers(tmp_path, certificates, ["a", "rogue-b"], timeout=5)
    for r in results:
        assert r.returncode == 1
        assert "error: round 1: the sites did not complete the round" in r.stdout
        assert "the tracker refused its certificate" in r.stdout
