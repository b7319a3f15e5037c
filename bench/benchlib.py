"""Helpers shared by the benchmarks: machine facts, tables, JSON results, an aggregator
process with mutual TLS, lightweight sites that speak the wire protocol without a model in
memory, and the peak memory of a process."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

from fedstudy.certs import read_credentials
from fedstudy.local import provision_tls
from fedstudy.spec import parse_study
from fedstudy.tensors import TensorSpec
from fedstudy.tls import channel_credentials
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc
from fedstudy.wire import tensors_pb2

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FLOWER_PYTHON = ROOT / ".venv-flower" / "bin" / "python"
CHUNK_BYTES = 1 << 20
# A large model is cut into tensors of this many float32 values at most (a 4096 x 4096
# layer, 64 MiB), as a big network's weight matrices are.
TENSOR_PARAMS = 4096 * 4096
# What a call sees when the aggregator has stopped (or is stopping) after the study.
GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


# ----------------------------------------------------------------------------- machine


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """What a result was measured on, and when."""
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "load_before": [round(x, 2) for x in load_average()],
    }


def finish_machine(info: dict[str, Any]) -> dict[str, Any]:
    info["load_after"] = [round(x, 2) for x in load_average()]
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def header_line(info: dict[str, Any]) -> str:
    return (
        f"{info['date']}, {info['cpus']} CPUs, {info['memory_gib']} GiB, "
        f"load average before {info['load_before']}"
    )


# ----------------------------------------------------------------------------- memory


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon and RssFile of a process, in bytes."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


# ----------------------------------------------------------------------------- studies


def study_doc(name: str, sites: Sequence[str], rounds: int, **spec: Any) -> dict[str, Any]:
    """A study whose sites need no data files (the sites here never read data)."""
    doc: dict[str, Any] = {
        "apiVersion": "fedstudy.io/v1alpha1",
        "kind": "FederatedStudy",
        "metadata": {"name": name},
        "spec": {
            "task": {"label": "malignant"},
            "model": {"name": "logistic-regression"},
            "rounds": rounds,
            "minSites": len(sites),
            "roundTimeoutSeconds": 3600,
            "sites": [
                {
                    "name": s,
                    "data": {
                        "format": "builtin",
                        "dataset": "breast-cancer",
                        "partition": {"index": i, "count": len(sites)},
                    },
                }
                for i, s in enumerate(sites)
            ],
        },
    }
    doc["spec"].update(spec)
    return doc


def model_layout(params: int, tensor_params: int = TENSOR_PARAMS) -> list[TensorSpec]:
    """``params`` float32 values as 2-D tensors of at most ``tensor_params`` values each."""
    specs: list[TensorSpec] = []
    left, i = params, 0
    while left > 0:
        n = min(left, tensor_params)
        cols = 4096 if n % 4096 == 0 and n >= 4096 else n
        specs.append(TensorSpec(f"layer{i}.weight", "float32", (n // cols, cols)))
        left -= n
        i += 1
    return specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class AggregatorProcess:
    """``fedstudy aggregator`` as a process with mutual TLS; the study file and TLS folders
    under ``work``."""

    proc: subprocess.Popen[bytes]
    grpc: str
    http: str
    tls: dict[str, Path]
    log: Path
    state: Path

    @classmethod
    def start(cls, doc: dict[str, Any], work: Path, linger: float = 2.0) -> AggregatorProcess:
        work.mkdir(parents=True, exist_ok=True)
        study_file = work / "study.yaml"
        study_file.write_text(yaml.safe_dump(doc))
        tls = provision_tls(parse_study(doc), work / "tls")
        state = work / "state"
        log = work / "aggregator.log"
        endpoint = state / "endpoint.json"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedstudy",
                    "aggregator",
                    "--study",
                    str(study_file),
                    "--listen",
                    "127.0.0.1:0",
                    "--http",
                    "127.0.0.1:0",
                    "--state-dir",
                    str(state),
                    "--out",
                    str(work / "out"),
                    "--linger",
                    str(linger),
                    "--tls-dir",
                    str(tls["aggregator"]),
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the aggregator exited:\n{log.read_text()[-3000:]}")
            try:
                ep = json.loads(endpoint.read_text())
                if ep.get("pid") == proc.pid:
                    return cls(proc, str(ep["grpc"]), str(ep["http"]), tls, log, state)
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError("the aggregator did not start in 60 s")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def round_times(events: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per round, from the aggregator's log: ``open_to_close`` (the round's own duration)
    and ``cycle`` (round open to the next round's open: close, checkpoint and the new round's
    start included)."""
    opens = {e["round"]: e["ts"] for e in events if e.get("event") == "round-open"}
    closes = {e["round"]: e["ts"] for e in events if e.get("event") == "round-complete"}
    o2c = [closes[r] - opens[r] for r in sorted(opens) if r in closes]
    cycles = [opens[r + 1] - opens[r] for r in sorted(opens) if r + 1 in opens]
    return {"open_to_close": o2c, "cycle": cycles}


# ----------------------------------------------------------------------------- sites


def secure_channel(target: str, tls_dir: Path, name: str) -> grpc.Channel:
    creds = read_credentials(tls_dir, name)
    return grpc.secure_channel(
        target,
        channel_credentials(creds),
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )


def chunk_pool(seed: int, count: int = 4, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """A few chunks of float32 values; a site streams them over and over as its weights."""
    rng = np.random.default_rng(seed)
    n = chunk_bytes // 4
    base = np.random.default_rng(0).normal(0, 0.02, size=(count, n)).astype(np.float32)
    noise = rng.normal(0, 0.001, size=(count, n)).astype(np.float32)
    return [(base[i] + noise[i]).tobytes() for i in range(count)]


def stream_weights(
    specs: Sequence[TensorSpec], pool: Sequence[bytes], shift: int = 0
) -> Iterator[tensors_pb2.TensorChunk]:
    """The chunks of a model of ``specs`` cut from ``pool``: a whole model's stream with never
    more than one chunk made at a time."""
    j = shift
    for spec in specs:
        size = spec.nbytes
        offset = 0
        while offset < size or offset == 0:
            piece = pool[j % len(pool)]
            j += 1
            n = min(len(piece), size - offset)
            data = piece if n == len(piece) else piece[:n]
            if offset == 0:
                yield tensors_pb2.TensorChunk(
                    name=spec.name,
                    dtype=spec.dtype,
                    shape=list(spec.shape),
                    total_bytes=size,
                    offset=0,
                    data=data,
                )
            else:
                yield tensors_pb2.TensorChunk(name=spec.name, offset=offset, data=data)
            offset += n
            if size == 0:
                break


class LightSite:
    """A site that answers the aggregator's tasks without training: it downloads the global
    model (counting and dropping the bytes) and sends back a perturbed copy made chunk by
    chunk. It never holds a whole model."""

    def __init__(
        self,
        stub: pb_grpc.AggregatorStub,
        study: str,
        name: str,
        specs: Sequence[TensorSpec],
        seed: int,
        samples: int = 100,
    ) -> None:
        self.stub = stub
        self.study = study
        self.name = name
        self.specs = list(specs)
        self.pool = chunk_pool(seed)
        self.samples = samples
        self.downloaded = 0
        self.sent = 0

    def join(self) -> None:
        r = self.stub.Join(
            pb.JoinRequest(
                study=self.study,
                site=self.name,
                train_samples=self.samples,
                test_samples=10,
                model=[s.to_proto() for s in self.specs],
            ),
            timeout=600,
        )
        if not r.accepted:
            raise RuntimeError(f"{self.name}: join refused: {r.reason} {r.message}")

    def submit(self, round_: int) -> None:
        total = sum(s.nbytes for s in self.specs)
        header = pb.UpdateHeader(
            study=self.study,
            site=self.name,
            round=round_,
            base_version=max(round_ - 1, 0),
            num_samples=self.samples,
            update_id=uuid.uuid4().hex,
            train_loss=0.5,
            tensor_count=len(self.specs),
            total_bytes=total,
        )

        def messages() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=header)
            for c in stream_weights(self.specs, self.pool, shift=round_):
                yield pb.UpdateChunk(tensor=c)

        # As a trainer does: room reserved first, so that no upload waits half-sent.
        reservation = pb.UploadReservation(header=header, wait_seconds=30)
        while not (grant := self.stub.ReserveUpload(reservation, timeout=90)).granted:
            if grant.reason != "busy":
                raise RuntimeError(f"{self.name}: round {round_} refused: {grant.reason}")
        receipt = self.stub.SubmitUpdate(messages(), timeout=3600)
        if not receipt.accepted:
            raise RuntimeError(f"{self.name}: round {round_} refused: {receipt.reason}")
        self.sent += total

    def download(self, version: int) -> None:
        req = pb.DownloadRequest(study=self.study, site=self.name, model_version=version)
        for c in self.stub.DownloadModel(req, timeout=3600):
            self.downloaded += len(c.data)

    def run(self, wait: float = 5.0) -> None:
        self.join()
        req = pb.TaskRequest(study=self.study, site=self.name, wait_seconds=wait)
        kinds = pb.TaskResponse
        reported = False
        while True:
            try:
                task = self.stub.GetTask(req, timeout=wait + 600)
            except grpc.RpcError as e:
                # Once done, the aggregator waits a few seconds for every site to hear it,
                # then exits: a site that asks later finds no one there.
                if (
                    reported
                    and isinstance(e, grpc.Call)
                    and e.code() == grpc.StatusCode.UNAVAILABLE
                ):
                    return
                raise
            if task.kind == kinds.DONE:
                return
            if task.kind == kinds.INIT:
                self.submit(0)
            elif task.kind == kinds.TRAIN:
                self.download(task.model_version)
                self.submit(task.round)
            elif task.kind == kinds.FINISH:
                self.stub.Report(
                    pb.ReportRequest(
                        study=self.study,
                        site=self.name,
                        kind=pb.ReportRequest.FINAL,
                        model_version=task.model_version,
                        test_samples=10,
                        metrics={"accuracy": 0.5},
                    ),
                    timeout=600,
                )
                reported = True
            elif task.kind == kinds.REJOIN:
                self.join()
