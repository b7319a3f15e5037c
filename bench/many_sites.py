"""Many sites: 100 and 500 simulated sites against the real aggregator.

The aggregator is ``fedstudy aggregator`` in its own process (mutual TLS, one certificate
per site). The sites are asyncio gRPC clients in one other process, each with its own
channel and certificate; each round a site downloads the global model and sends back a
perturbed copy (no training). Reported: seconds per round (open to close, and open to next
open), the aggregator's idle and peak resident memory, and the seconds from the first join
to the first round's opening (every site joined and the initial model in).

    .venv/bin/python bench/many_sites.py --sites 100 500 --json bench/results/many_sites.json

The sites' process shares the machine's cores with the aggregator: on a small machine part
of what is measured is the clients' own work (TLS, protobuf) for hundreds of streams.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    AggregatorProcess,
    chunk_pool,
    finish_machine,
    header_line,
    machine,
    median,
    model_layout,
    proc_status,
    round_times,
    study_doc,
    table,
    write_result,
)

from fedstudy.certs import read_credentials
from fedstudy.tensors import TensorSpec
from fedstudy.tls import channel_credentials
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc
from fedstudy.wire import tensors_pb2

STUDY = "many"


def site_names(n: int) -> list[str]:
    return [f"site{i:03d}" for i in range(n)]


def chunks_of(specs: list[TensorSpec], pool: list[bytes], shift: int) -> list[pb.UpdateChunk]:
    """A small model's update as messages (tensors of at most one chunk each)."""
    out = []
    for i, spec in enumerate(specs):
        data = pool[(shift + i) % len(pool)][: spec.nbytes]
        out.append(
            pb.UpdateChunk(
                tensor=tensors_pb2.TensorChunk(
                    name=spec.name,
                    dtype=spec.dtype,
                    shape=list(spec.shape),
                    total_bytes=spec.nbytes,
                    offset=0,
                    data=data,
                )
            )
        )
    return out


async def one_site(
    target: str, tls_dir: Path, name: str, index: int, specs: list[TensorSpec], pool: list[bytes]
) -> None:
    creds = read_credentials(tls_dir, name)
    async with grpc.aio.secure_channel(target, channel_credentials(creds)) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        joined = await stub.Join(
            pb.JoinRequest(
                study=STUDY,
                site=name,
                train_samples=100,
                test_samples=10,
                model=[s.to_proto() for s in specs],
            ),
            timeout=600,
        )
        if not joined.accepted:
            raise RuntimeError(f"{name}: join refused: {joined.reason}")
        total = sum(s.nbytes for s in specs)
        req = pb.TaskRequest(study=STUDY, site=name, wait_seconds=10)
        kinds = pb.TaskResponse
        while True:
            task = await stub.GetTask(req, timeout=600)
            if task.kind == kinds.DONE:
                return
            if task.kind in (kinds.INIT, kinds.TRAIN):
                if task.kind == kinds.TRAIN:
                    dl = pb.DownloadRequest(
                        study=STUDY, site=name, model_version=task.model_version
                    )
                    async for _ in stub.DownloadModel(dl, timeout=600):
                        pass
                header = pb.UpdateHeader(
                    study=STUDY,
                    site=name,
                    round=task.round,
                    base_version=max(task.round - 1, 0),
                    num_samples=100,
                    update_id=uuid.uuid4().hex,
                    train_loss=0.5,
                    tensor_count=len(specs),
                    total_bytes=total,
                )
                msgs = [pb.UpdateChunk(header=header), *chunks_of(specs, pool, index + task.round)]
                # As a trainer does: room reserved first (one update arrives at a time).
                ask = pb.UploadReservation(header=header, wait_seconds=10)
                while not (grant := await stub.ReserveUpload(ask, timeout=600)).granted:
                    if grant.reason != "busy":
                        break  # e.g. stale-round: the receipt below says so
                receipt = await stub.SubmitUpdate(iter(msgs), timeout=600)
                if not receipt.accepted and receipt.reason != "stale-round":
                    raise RuntimeError(f"{name}: refused: {receipt.reason} {receipt.message}")
            elif task.kind == kinds.FINISH:
                await stub.Report(
                    pb.ReportRequest(
                        study=STUDY,
                        site=name,
                        kind=pb.ReportRequest.FINAL,
                        model_version=task.model_version,
                        test_samples=10,
                        metrics={"accuracy": 0.5},
                    ),
                    timeout=600,
                )
            elif task.kind == kinds.REJOIN:
                raise RuntimeError(f"{name}: asked to rejoin")


async def all_sites(target: str, tls: dict[str, Path], n: int, params: int) -> None:
    specs = model_layout(params, tensor_params=1 << 18)
    pool = chunk_pool(7, count=8, chunk_bytes=max(s.nbytes for s in specs))
    names = site_names(n)
    await asyncio.gather(
        *(one_site(target, tls[name], name, i, specs, pool) for i, name in enumerate(names))
    )


def _sites_main(args: argparse.Namespace) -> None:
    tls = {n: Path(args.tls_root) / n for n in site_names(args.n)}
    asyncio.run(all_sites(args.target, tls, args.n, args.params))


def run_case(n: int, params: int, rounds: int, work: Path) -> dict[str, Any]:
    names = site_names(n)
    agg = AggregatorProcess.start(study_doc(STUDY, names, rounds), work)
    idle = proc_status(agg.proc.pid).get("VmRSS", 0)
    tls_root = agg.tls[names[0]].parent
    sites = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "sites",
            "--target",
            agg.grpc,
            "--tls-root",
            str(tls_root),
            "--n",
            str(n),
            "--params",
            str(params),
        ]
    )
    peak = 0
    try:
        while agg.proc.poll() is None:
            peak = max(peak, proc_status(agg.proc.pid).get("VmHWM", 0))
            if sites.poll() not in (None, 0):
                raise RuntimeError(f"the sites' process failed; aggregator log: {agg.log}")
            time.sleep(0.05)
        sites.wait(120)
        if agg.proc.returncode != 0 or sites.returncode != 0:
            raise RuntimeError(f"exit codes {agg.proc.returncode}, {sites.returncode}")
    finally:
        if sites.poll() is None:
            sites.kill()
        agg.stop()
    events = agg.events()
    times = round_times(events)
    joins = [e["ts"] for e in events if e.get("event") == "site-joined"]
    first_open = min(e["ts"] for e in events if e.get("event") == "round-open")
    model_bytes = sum(s.nbytes for s in model_layout(params, tensor_params=1 << 18))
    return {
        "sites": n,
        "params": params,
        "model_bytes": model_bytes,
        "rounds": rounds,
        "round_s": median(times["open_to_close"]),
        "cycle_s": median(times["cycle"]),
        "rounds_open_to_close_s": times["open_to_close"],
        "join_to_first_round_s": first_open - min(joins),
        "idle_rss": idle,
        "peak_rss": peak,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode")
    s = sub.add_parser("sites")
    s.add_argument("--target", required=True)
    s.add_argument("--tls-root", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--params", type=int, required=True)
    ap.add_argument("--sites", nargs="+", type=int, default=[100, 500])
    ap.add_argument("--params", type=int, default=10_000, help="float32 values in the model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.mode == "sites":
        _sites_main(args)
        return 0
    info = machine()
    print(header_line(info))
    cases = []
    root = Path(tempfile.mkdtemp(prefix="fedstudy-many-"))
    try:
        for n in args.sites:
            case = run_case(n, args.params, args.rounds, root / str(n))
            cases.append(case)
            print(
                f"{n} sites: round {case['round_s']:.2f} s (cycle {case['cycle_s']:.2f} s), "
                f"peak {case['peak_rss'] / 2**20:.0f} MiB",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        table(
            [
                "sites",
                "params",
                "round s",
                "cycle s",
                "ms per site",
                "joins to round 1 s",
                "idle MiB",
                "peak MiB",
            ],
            [
                [
                    c["sites"],
                    c["params"],
                    c["round_s"],
                    c["cycle_s"],
                    1000 * c["round_s"] / c["sites"],
                    c["join_to_first_round_s"],
                    f"{c['idle_rss'] / 2**20:.0f}",
                    f"{c['peak_rss'] / 2**20:.0f}",
                ]
                for c in cases
            ],
        )
    )
    write_result(
        args.json,
        {
            "benchmark": "many_sites",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": finish_machine(info),
            "cases": cases,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
