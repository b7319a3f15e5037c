"""The synthetic ICU cohort: deterministic from its seed, plausible values, realistic gaps,
a sepsis prevalence near 7 %, and site shares of whole patients with different case mixes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fedstudy_trainer.synthetic import (
    COLUMNS,
    ID_COLUMN,
    LABEL_COLUMN,
    MEASUREMENTS,
    SEPSIS_PATIENTS,
    TIME_COLUMN,
    VITALS,
    patient_labels,
    sepsis_cohort,
    sepsis_share,
)

from fedstudy.spec import Partition


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return sepsis_cohort(seed=4)


def test_the_same_seed_gives_the_same_cohort(cohort: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(sepsis_cohort(seed=4), cohort)
    other = sepsis_cohort(seed=5)
    assert not other["heart_rate"].equals(cohort["heart_rate"])


def test_columns_stays_and_hours(cohort: pd.DataFrame) -> None:
    assert tuple(cohort.columns) == COLUMNS
    stays = cohort.groupby(ID_COLUMN)[TIME_COLUMN].agg(["min", "max", "count"])
    assert len(stays) == SEPSIS_PATIENTS
    assert (stays["min"] == 0).all()
    assert (stays["count"] == stays["max"] + 1).all()  # one row per hour, no gaps
    assert stays["count"].between(24, 72).all()


def test_sepsis_prevalence_and_onsets(cohort: pd.DataFrame) -> None:
    labels = patient_labels(cohort)
    assert 0.05 <= labels.mean() <= 0.10
    for _, rows in cohort.groupby(ID_COLUMN):
        flags = rows[LABEL_COLUMN].to_numpy()
        if flags.any():
            onset = int(np.argmax(flags))
            assert onset >= 6  # hours to warn in
            assert flags[onset:].all()  # once septic, the flag stays


def test_values_lie_in_physiological_ranges(cohort: pd.DataFrame) -> None:
    for v in VITALS:
        values = cohort[v.name].dropna()
        assert values.between(v.low, v.high).all(), v.name
    medians = cohort[list(MEASUREMENTS)].median()
    assert 70 <= medians["heart_rate"] <= 95
    assert 12 <= medians["resp_rate"] <= 20
    assert 36.3 <= medians["temperature"] <= 37.5
    assert 105 <= medians["sbp"] <= 140
    assert 94 <= medians["spo2"] <= 99
    assert 0.7 <= medians["lactate"] <= 2.0
    assert 5 <= medians["wbc"] <= 11


def test_septic_hours_look_worse(cohort: pd.DataFrame) -> None:
    means = cohort.groupby(LABEL_COLUMN)[["heart_rate", "resp_rate", "sbp", "lactate"]].mean()
    assert means.loc[1, "heart_rate"] > means.loc[0, "heart_rate"] + 15
    assert means.loc[1, "resp_rate"] > means.loc[0, "resp_rate"] + 4
    assert means.loc[1, "sbp"] < means.loc[0, "sbp"] - 15
    assert means.loc[1, "lactate"] > means.loc[0, "lactate"] + 1


def test_gaps_as_in_a_chart(cohort: pd.DataFrame) -> None:
    missing = cohort[list(MEASUREMENTS)].isna().mean()
    assert missing["heart_rate"] < 0.15
    assert 0.6 < missing["temperature"] < 0.9
    for lab in ("lactate", "wbc", "creatinine"):
        assert missing[lab] > 0.8
    # Lactate is drawn more often when a patient deteriorates.
    by_label = cohort.groupby(LABEL_COLUMN)["lactate"].apply(lambda s: s.notna().mean())
    assert by_label[1] > 3 * by_label[0]


def test_shares_are_whole_patients_covering_the_cohort_with_different_case_mixes() -> None:
    shares = [
        sepsis_share(Partition(index=i, count=3, labelSkew=0.5, seed=2), patients=900)
        for i in range(3)
    ]
    ids = [set(s[ID_COLUMN]) for s in shares]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not ids[a] & ids[b]
    whole = sepsis_cohort(900, seed=2)
    assert set().union(*ids) == set(whole[ID_COLUMN])
    assert sum(len(s) for s in shares) == len(whole)
    prevalence = [patient_labels(s).mean() for s in shares]
    assert prevalence[0] < prevalence[1] < prevalence[2]
