"""A synthetic ICU cohort for sepsis early warning: a long-format table of hourly vitals and labs.

The data are made up: no patient stands behind any row. They are generated to look like the
hourly charts of an adult ICU (heart rate, respiratory rate, temperature, systolic blood
pressure, SpO2, lactate, white cell count, creatinine), so that studies, tests and benchmarks
of sequence models have something realistic to learn from, with a known answer. The same
``seed`` always gives the same cohort, on any machine.

Each patient has a stay of 24 to 72 hours, an age, a latent severity and baseline values of
their own, with hourly drift (a first-order autoregressive process) around them. About 7 % of
patients develop sepsis at an onset hour drawn over their stay; their vitals and labs turn
over the hours before the onset (faster heart and breathing, fever or, in some, a low
temperature, falling blood pressure and SpO2, rising lactate, a high or low white cell count,
rising creatinine) and keep worsening after it. Some other patients have a transient episode
(a fever and a faster heart rate that resolve), which a model must not mistake for sepsis.

Values are missing as in a real chart: vitals now and then, temperature about every 4 hours,
labs at admission, once a day, and more often in a patient who is deteriorating (the
missingness itself carries information, as it does in real records).

Columns: ``patient_id``, ``hour`` (from 0), ``age``, the eight measurements and ``sepsis``
(0 before the onset hour, 1 from it on; always 0 for a patient who never develops sepsis).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from fedstudy.spec import Partition

SEPSIS_DATASET = "synthetic-sepsis"
# Patients in the built-in cohort (shared out between a study's simulated sites).
SEPSIS_PATIENTS = 1500
ID_COLUMN = "patient_id"
TIME_COLUMN = "hour"
LABEL_COLUMN = "sepsis"


@dataclass(frozen=True)
class Vital:
    """One measurement: its column, hourly noise, sepsis effect, range and rounding."""

    name: str
    noise: float  # standard deviation of the hourly innovation of the AR(1) drift
    effect: float  # change at full deterioration (before the per-patient direction)
    low: float
    high: float
    decimals: int


VITALS = (
    Vital("heart_rate", 3.0, 28.0, 30.0, 200.0, 0),
    Vital("resp_rate", 1.2, 9.0, 6.0, 50.0, 0),
    Vital("temperature", 0.12, 1.4, 33.0, 42.0, 1),
    Vital("sbp", 6.0, -28.0, 50.0, 230.0, 0),
    Vital("spo2", 0.7, -4.0, 70.0, 100.0, 0),
    Vital("lactate", 0.12, 2.8, 0.3, 15.0, 1),
    Vital("wbc", 0.35, 7.0, 0.5, 50.0, 1),
    Vital("creatinine", 0.04, 0.6, 0.2, 10.0, 2),
)
MEASUREMENTS = tuple(v.name for v in VITALS)
COLUMNS = (ID_COLUMN, TIME_COLUMN, "age", *MEASUREMENTS, LABEL_COLUMN)

# Logistic model of who develops sepsis; the intercept puts the prevalence near 7 %.
_RISK_INTERCEPT = -2.85
_AR = 0.8  # hour-to-hour persistence of the drift around a patient's baseline


def _sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-x))
    return out


def _drift(rng: np.random.Generator, hours: int, sd: float) -> npt.NDArray[np.float64]:
    """A stationary AR(1) series with innovations of standard deviation ``sd``."""
    shocks = rng.normal(0.0, sd, hours)
    out = np.empty(hours)
    level = shocks[0] / np.sqrt(1.0 - _AR**2)  # start from the stationary spread
    for i in range(hours):
        if i:
            level = _AR * level + shocks[i]
        out[i] = level
    return out


def _patient(rng: np.random.Generator, number: int) -> dict[str, npt.NDArray[np.generic]]:
    """One patient's hourly rows, as columns."""
    age = float(np.clip(rng.normal(63.0, 15.0), 18.0, 95.0))
    severity = rng.normal()
    risk = _RISK_INTERCEPT + 0.02 * (age - 63.0) + 0.7 * severity
    septic = bool(rng.random() < _sigmoid(np.array([risk]))[0])
    hours = int(rng.integers(24, 73))
    onset = None
    if septic:
        onset = int(rng.integers(6, hours - 3))
    t = np.arange(hours, dtype=np.float64)

    # Deterioration: 0 long before the onset, rising over the hours before it, then near 1.
    deterioration = np.zeros(hours)
    if onset is not None:
        deterioration = _sigmoid((t - (onset - 2.5)) / 1.8)
    # A transient, harmless episode (post-operative fever, pain) in some other patients.
    episode = np.zeros(hours)
    if onset is None and rng.random() < 0.35:
        start = rng.uniform(0.0, hours)
        episode = np.exp(-0.5 * ((t - start) / rng.uniform(1.5, 4.0)) ** 2)

    baselines = {
        "heart_rate": rng.normal(82.0 + 4.0 * severity, 9.0),
        "resp_rate": rng.normal(16.0 + 1.0 * severity, 2.0),
        "temperature": rng.normal(36.9, 0.3),
        "sbp": rng.normal(124.0 - 4.0 * severity, 13.0),
        "spo2": min(99.5, rng.normal(97.0 - 0.5 * severity, 1.2)),
        "lactate": float(np.exp(rng.normal(np.log(1.1), 0.3))),
        "wbc": rng.normal(8.0 + 0.6 * severity, 2.0),
        "creatinine": float(np.exp(rng.normal(np.log(0.9 + 0.004 * (age - 60)), 0.25))),
    }
    # The direction of a septic patient's temperature and white cell count.
    cold = rng.random() < 0.2
    leukopenic = rng.random() < 0.25
    columns: dict[str, npt.NDArray[np.generic]] = {}
    for v in VITALS:
        effect = v.effect
        if v.name == "temperature" and cold:
            effect = -1.0
        if v.name == "wbc" and leukopenic:
            effect = -4.0
        if v.name == "creatinine":
            effect = v.effect * baselines["creatinine"]
        values: npt.NDArray[np.float64] = (
            baselines[v.name] + _drift(rng, hours, v.noise) + effect * deterioration
        )
        if v.name == "heart_rate":
            values = values + 12.0 * episode
        elif v.name == "temperature":
            values = values + 0.9 * episode
        elif v.name == "resp_rate":
            values = values + 2.0 * episode
        rounded = np.round(np.clip(values, v.low, v.high), v.decimals).astype(np.float64)
        columns[v.name] = _observed(rng, v.name, rounded, t, deterioration)

    columns[ID_COLUMN] = np.full(hours, f"S{number:05d}", dtype=object)
    columns[TIME_COLUMN] = t.astype(np.int64)
    columns["age"] = np.full(hours, round(age))
    label = np.zeros(hours, dtype=np.int64)
    if onset is not None:
        label[onset:] = 1
    columns[LABEL_COLUMN] = label
    return columns


def _observed(
    rng: np.random.Generator,
    name: str,
    values: npt.NDArray[np.float64],
    t: npt.NDArray[np.float64],
    deterioration: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """``values`` with NaN where the measurement was not taken that hour."""
    hours = len(values)
    draw = rng.random(hours)
    if name in ("heart_rate", "spo2"):
        taken = draw >= 0.06
    elif name in ("resp_rate", "sbp"):
        taken = draw >= 0.12
    elif name == "temperature":
        phase = int(rng.integers(0, 4))
        taken = ((t.astype(np.int64) % 4) == phase) & (draw >= 0.1)
        taken |= draw < 0.3 * deterioration  # checked again when the patient looks unwell
    elif name == "lactate":
        taken = draw < 0.03 + 0.3 * deterioration
        taken[0] = rng.random() < 0.6
    else:  # wbc, creatinine: the morning labs, and when the patient deteriorates
        taken = (t.astype(np.int64) % 24 == 6) | (draw < 0.02 + 0.12 * deterioration)
        taken[0] = rng.random() < 0.9
    return np.where(taken, values, np.nan)


def sepsis_cohort(patients: int = SEPSIS_PATIENTS, seed: int = 0) -> pd.DataFrame:
    """The long-format table of ``patients`` synthetic ICU stays (see the module's notes)."""
    if patients < 1:
        raise ValueError(f"a cohort needs at least one patient, got {patients}")
    rng = np.random.default_rng(seed)
    parts = [_patient(rng, i + 1) for i in range(patients)]
    table = pd.DataFrame(
        {name: np.concatenate([p[name] for p in parts]) for name in COLUMNS}, columns=COLUMNS
    )
    return table


def patient_labels(table: pd.DataFrame) -> pd.Series:
    """1 for each patient who ever has sepsis, else 0 (indexed by patient, in table order)."""
    grouped = table.groupby(ID_COLUMN, sort=False)[LABEL_COLUMN].max()
    return grouped.astype(np.int64)


def sepsis_share(partition: Partition, patients: int = SEPSIS_PATIENTS) -> pd.DataFrame:
    """A simulated site's share of the cohort made from ``partition.seed``: whole patients,
    dealt out as ``partition_rows`` deals the rows of a table (``labelSkew`` moves septic
    patients from the first sites to the last ones, so the sites differ in case mix)."""
    from fedstudy_trainer.data import partition_rows

    table = sepsis_cohort(patients, partition.seed)
    labels = patient_labels(table)
    shares = partition_rows(
        labels.to_numpy(),
        partition.count,
        partition.labelSkew,
        partition.seed,
        f"builtin:{SEPSIS_DATASET}",
    )
    chosen = set(labels.index[shares[partition.index]])
    return table[table[ID_COLUMN].isin(chosen)].reset_index(drop=True)
