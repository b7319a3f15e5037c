"""Aggregation at size: seconds per round and the aggregator's peak memory, next to floors.

For each model size and number of sites, the real aggregator (``fedstudy aggregator``, mutual
TLS, its own process) runs a FedAvg study against that many site processes on loopback.
A site does not train: each round it downloads the global model and sends back a perturbed
copy. Sites build their stream one 1 MiB chunk at a time from a small pool of chunks, so a
site never holds a model (a 16-site round of a 2 GB model needs no 32 GB) and costs almost no
CPU: what is measured is the aggregator and the wire.

Measured in the same run, as floors:
- ``numpy``: the weighted sum of as many model-sized float32 arrays as there are sites, in
  place, block by block (no network, no checks);
- ``raw loopback``: a plain TCP socket between two processes, no TLS, no framing; its rate
  gives the time the round's bytes (each site's download and upload) would take;
- ``TLS``: the same socket with mutual TLS (Python's ssl);
- ``gRPC``: one client-streaming call of grpcio with mutual TLS between two processes, 1 MiB
  messages of plain bytes (no protobuf, no checks): what the library itself can carry.

Peak memory is the aggregator process's ``VmHWM`` (peak resident set); ``idle`` is its RSS
once listening, before any model exists; ``x model`` is (peak - idle) / model bytes.

    .venv/bin/python bench/aggregation.py --params 1M 25M 100M 500M --sites 2 4 8 16 \\
        --json bench/results/aggregation.json

``--verify`` also checks the final model against the mean the sites' streams imply.
``--flower`` runs the same sizes through Flower 1.42's ``run_simulation`` (needs
``.venv-flower``, see bench/setup-flower.sh).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    CHUNK_BYTES,
    FLOWER_PYTHON,
    ROOT,
    AggregatorProcess,
    LightSite,
    chunk_pool,
    finish_machine,
    header_line,
    machine,
    median,
    model_layout,
    proc_status,
    round_times,
    secure_channel,
    study_doc,
    table,
    write_result,
)

from fedstudy.certs import issue_cert, make_ca
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc

STUDY = "size"
GB = 1e9


def parse_count(text: str) -> int:
    """``25M``, ``1.5G``, ``4k`` or a plain number."""
    scale = {"k": 10**3, "M": 10**6, "G": 10**9}
    if text and text[-1] in scale:
        return int(float(text[:-1]) * scale[text[-1]])
    return int(text)


def site_seed(i: int) -> int:
    return 1000 + i


# ----------------------------------------------------------------------------- floors


def numpy_floor(params: int, sites: int, block: int = 1 << 22) -> float:
    """Seconds for the sample-weighted mean of ``sites`` model-sized arrays, in place."""
    x = np.random.default_rng(1).normal(size=min(params, block)).astype(np.float32)
    acc = np.zeros(params, dtype=np.float32)
    tmp = np.empty(min(params, block), dtype=np.float32)
    weights = [1.0 / sites] * sites
    started = time.perf_counter()
    for w in weights:
        for start in range(0, params, block):
            end = min(start + block, params)
            np.multiply(x[: end - start], w, out=tmp[: end - start])
            acc[start:end] += tmp[: end - start]
    return time.perf_counter() - started


def _tls_contexts(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts with mutual TLS, from a throwaway CA in ``folder``."""
    ca_cert, ca_key = make_ca("loopback")
    server = issue_cert("aggregator", ca_cert, ca_key, server=True, hosts=["127.0.0.1"])
    client = issue_cert("site", ca_cert, ca_key)
    (folder / "ca.crt").write_bytes(ca_cert)
    for name, creds in (("server", server), ("client", client)):
        (folder / f"{name}.crt").write_bytes(creds.cert)
        (folder / f"{name}.key").write_bytes(creds.key)
    srv = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(folder / "ca.crt"))
    srv.load_cert_chain(folder / "server.crt", folder / "server.key")
    srv.verify_mode = ssl.CERT_REQUIRED
    cli = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    cli.load_cert_chain(folder / "client.crt", folder / "client.key")
    return srv, cli


def _sink(port_file: Path, tls_dir: Path | None = None) -> None:
    """The receiving end of the loopback floors: reads until the sender closes (plain), or
    the announced number of bytes (TLS), then answers one byte."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port_file.write_text(str(srv.getsockname()[1]))
        conn, _ = srv.accept()
        if tls_dir is not None:
            context = ssl.create_default_context(
                ssl.Purpose.CLIENT_AUTH, cafile=str(tls_dir / "ca.crt")
            )
            context.load_cert_chain(tls_dir / "server.crt", tls_dir / "server.key")
            context.verify_mode = ssl.CERT_REQUIRED
            conn = context.wrap_socket(conn, server_side=True)
        with conn:
            buf = bytearray(CHUNK_BYTES)
            view = memoryview(buf)
            if tls_dir is None:
                while conn.recv_into(view):
                    pass
            else:
                left = int.from_bytes(conn.recv(8), "little")
                while left > 0:
                    left -= conn.recv_into(view, min(len(buf), left))
            conn.sendall(b"k")


def raw_loopback_rate(nbytes: int, tls: bool = False) -> float:
    """Bytes per second of one TCP stream over loopback to another process: plain, or with
    mutual TLS (Python's ssl, OpenSSL) as the gRPC link has."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        cmd = [sys.executable, __file__, "sink", str(port_file)]
        client_ctx = None
        if tls:
            _, client_ctx = _tls_contexts(Path(tmp))
            cmd += ["--tls-dir", tmp]
        sink = subprocess.Popen(cmd)
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline:
                    raise RuntimeError("the sink did not start")
                time.sleep(0.01)
            port = int(port_file.read_text())
            payload = memoryview(bytes(CHUNK_BYTES))
            raw = socket.create_connection(("127.0.0.1", port))
            s = (
                raw
                if client_ctx is None
                else client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            )
            with s:
                if tls:
                    s.sendall(nbytes.to_bytes(8, "little"))
                started = time.perf_counter()
                sent = 0
                while sent < nbytes:
                    n = min(CHUNK_BYTES, nbytes - sent)
                    s.sendall(payload[:n])
                    sent += n
                if not tls:
                    s.shutdown(socket.SHUT_WR)
                s.recv(1)
                seconds = time.perf_counter() - started
        finally:
            sink.wait(30)
    return nbytes / seconds


def _grpc_sink(port_file: Path, tls_dir: Path) -> None:
    """The receiving end of the gRPC floor: one method that copies each message into a
    model-sized buffer, as a receiver must, and answers the byte count."""
    import grpc

    def put(messages: Any, context: Any) -> bytes:
        size = 0
        buf = bytearray(CHUNK_BYTES)
        for m in messages:
            buf[: len(m)] = m
            size += len(m)
        return size.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "floor.Sink",
        {"Put": grpc.stream_unary_rpc_method_handler(put, lambda b: b, lambda b: b)},
    )
    creds = grpc.ssl_server_credentials(
        [((tls_dir / "server.key").read_bytes(), (tls_dir / "server.crt").read_bytes())],
        root_certificates=(tls_dir / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    port_file.write_text(str(port))
    server.wait_for_termination(timeout=600)


def grpc_loopback_rate(nbytes: int) -> float:
    """Bytes per second of one grpcio stream with mutual TLS to another process."""
    import grpc

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _tls_contexts(folder)
        port_file = folder / "port"
        sink = subprocess.Popen(
            [sys.executable, __file__, "grpc-sink", str(port_file), "--tls-dir", tmp]
        )
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline:
                    raise RuntimeError("the gRPC sink did not start")
                time.sleep(0.01)
            creds = grpc.ssl_channel_credentials(
                (folder / "ca.crt").read_bytes(),
                (folder / "client.key").read_bytes(),
                (folder / "client.crt").read_bytes(),
            )
            target = f"127.0.0.1:{port_file.read_text()}"
            with grpc.secure_channel(target, creds) as channel:
                put = channel.stream_unary("/floor.Sink/Put", lambda b: b, lambda b: b)
                payload = bytes(CHUNK_BYTES)

                def messages() -> Any:
                    sent = 0
                    while sent < nbytes:
                        n = min(CHUNK_BYTES, nbytes - sent)
                        yield payload[:n] if n < CHUNK_BYTES else payload
                        sent += n

                started = time.perf_counter()
                got = int.from_bytes(put(messages(), timeout=600), "little")
                seconds = time.perf_counter() - started
            if got != nbytes:
                raise RuntimeError(f"the gRPC sink received {got} of {nbytes} bytes")
        finally:
            sink.kill()
            sink.wait(30)
    return nbytes / seconds


# ----------------------------------------------------------------------------- one case


def _site_main(args: argparse.Namespace) -> None:
    specs = model_layout(args.params)
    channel = secure_channel(args.target, Path(args.tls_dir), args.name)
    site = LightSite(pb_grpc.AggregatorStub(channel), STUDY, args.name, specs, args.seed)
    site.run()
    channel.close()


def expected_chunks(sites: int) -> list[np.ndarray[Any, Any]]:
    """The mean of the sites' chunk pools (equal sample counts), chunk by chunk."""
    pools = [chunk_pool(site_seed(i)) for i in range(sites)]
    means = []
    for k in range(len(pools[0])):
        arrs = [np.frombuffer(p[k], dtype=np.float32) for p in pools]
        acc = arrs[0].copy()
        for i, a in enumerate(arrs[1:], start=2):
            acc += (a - acc) * np.float32(1.0 / i)
        means.append(acc)
    return means


def verify(out: Path, params: int, sites: int, rounds: int) -> str:
    """Checks ``model.safetensors`` against the mean of the last round's streams."""
    from safetensors import safe_open

    specs = model_layout(params)
    means = expected_chunks(sites)
    per_chunk = CHUNK_BYTES // 4
    j = rounds
    worst = 0.0
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        for spec in specs:
            arr = f.get_tensor("model/" + spec.name).reshape(-1)
            for start in range(0, arr.size, per_chunk):
                piece = arr[start : start + per_chunk]
                want = means[j % len(means)][: piece.size]
                worst = max(worst, float(np.max(np.abs(piece - want))))
                j += 1
    if worst > 1e-5:
        raise SystemExit(f"the final model differs from the expected mean by {worst:g}")
    return f"final model matches the mean of the sites' updates (max abs diff {worst:.2g})"


def run_case(params: int, sites: int, rounds: int, work: Path, check: bool) -> dict[str, Any]:
    names = [f"site{i:02d}" for i in range(sites)]
    specs = model_layout(params)
    model_bytes = sum(s.nbytes for s in specs)
    agg = AggregatorProcess.start(study_doc(STUDY, names, rounds), work)
    idle = proc_status(agg.proc.pid).get("VmRSS", 0)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "site",
                "--target",
                agg.grpc,
                "--tls-dir",
                str(agg.tls[n]),
                "--name",
                n,
                "--params",
                str(params),
                "--seed",
                str(site_seed(i)),
            ]
        )
        for i, n in enumerate(names)
    ]
    peak = 0
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    try:
        while agg.proc.poll() is None:
            st = proc_status(agg.proc.pid)
            if st:
                peak = max(peak, st.get("VmHWM", 0))
                samples.append((round(time.monotonic() - started, 2), st.get("VmRSS", 0)))
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError(f"a site failed; aggregator log: {agg.log}")
            time.sleep(0.05)
        if agg.proc.returncode != 0:
            raise RuntimeError(f"the aggregator exited {agg.proc.returncode}; log: {agg.log}")
        for p in procs:
            p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        agg.stop()
    times = round_times(agg.events())
    moved = 2 * sites * model_bytes  # each site downloads the model and uploads one
    o2c = median(times["open_to_close"])
    result = {
        "params": params,
        "model_bytes": model_bytes,
        "tensors": len(specs),
        "sites": sites,
        "rounds": rounds,
        "round_s": o2c,
        "cycle_s": median(times["cycle"]),
        "rounds_open_to_close_s": times["open_to_close"],
        "cycles_s": times["cycle"],
        "transfer_bytes_per_round": moved,
        "transfer_rate_Bps": moved / o2c if o2c > 0 else None,
        "idle_rss": idle,
        "peak_rss": peak,
        "peak_over_model": (peak - idle) / model_bytes,
        "rss_samples": samples[:: max(1, len(samples) // 200)],
    }
    if check:
        result["verified"] = verify(work / "out", params, sites, rounds)
    return result


# ----------------------------------------------------------------------------- flower


def flower_estimate(sites: int, model_bytes: int) -> float:
    """Flower's expected peak, from small runs (25M params, 4 sites: 20 model copies in the
    ServerApp's process alone): about five copies per site."""
    return (5 * sites + 4) * model_bytes


def run_flower(params: int, sites: int, rounds: int) -> dict[str, Any]:
    if not FLOWER_PYTHON.exists():
        return {"params": params, "sites": sites, "error": "no .venv-flower"}
    cmd = [
        str(FLOWER_PYTHON),
        str(ROOT / "bench" / "flower_size.py"),
        "--params",
        str(params),
        "--sites",
        str(sites),
        "--rounds",
        str(rounds),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
        return {"params": params, "sites": sites, "error": " | ".join(tail)[-800:]}
    out: dict[str, Any] = json.loads(lines[-1])
    return out


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode")
    site = sub.add_parser("site")
    site.add_argument("--target", required=True)
    site.add_argument("--tls-dir", required=True)
    site.add_argument("--name", required=True)
    site.add_argument("--params", type=int, required=True)
    site.add_argument("--seed", type=int, required=True)
    sink = sub.add_parser("sink")
    sink.add_argument("port_file", type=Path)
    sink.add_argument("--tls-dir", type=Path)
    grpc_sink = sub.add_parser("grpc-sink")
    grpc_sink.add_argument("port_file", type=Path)
    grpc_sink.add_argument("--tls-dir", type=Path, required=True)
    ap.add_argument("--params", nargs="+", default=["1M", "25M", "100M", "500M"])
    ap.add_argument("--sites", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--max-site-bytes",
        type=float,
        default=64e9,
        help="skip a case whose sites would move more than this many bytes per round",
    )
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--flower", action="store_true", help="the same sizes through Flower")
    ap.add_argument(
        "--flower-max-bytes",
        type=float,
        default=8e9,
        help="run Flower only where its expected peak memory fits in this many bytes",
    )
    ap.add_argument("--keep", type=Path, help="keep the work folders here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.mode == "site":
        _site_main(args)
        return 0
    if args.mode == "sink":
        _sink(args.port_file, args.tls_dir)
        return 0
    if args.mode == "grpc-sink":
        _grpc_sink(args.port_file, args.tls_dir)
        return 0

    info = machine()
    print(header_line(info))
    cases: list[dict[str, Any]] = []
    flower: list[dict[str, Any]] = []
    raw_rates: dict[int, float] = {}
    work_root = args.keep or Path(tempfile.mkdtemp(prefix="fedstudy-agg-"))
    try:
        for p_text in args.params:
            params = parse_count(p_text)
            model_bytes = model_layout(params)
            mb = sum(s.nbytes for s in model_bytes)
            rate = raw_loopback_rate(min(4 * mb, 2 << 30))
            tls_rate = raw_loopback_rate(min(4 * mb, 2 << 30), tls=True)
            grpc_rate = grpc_loopback_rate(min(4 * mb, 2 << 30))
            raw_rates[params] = rate
            for n in args.sites:
                if 2 * n * mb > args.max_site_bytes:
                    print(f"skip {p_text} x {n} sites: over --max-site-bytes")
                    continue
                work = work_root / f"{p_text}-{n}"
                shutil.rmtree(work, ignore_errors=True)
                case = run_case(params, n, args.rounds, work, args.verify)
                case["numpy_floor_s"] = numpy_floor(params, n)
                case["raw_loopback_Bps"] = rate
                case["raw_floor_s"] = case["transfer_bytes_per_round"] / rate
                case["tls_loopback_Bps"] = tls_rate
                case["tls_floor_s"] = case["transfer_bytes_per_round"] / tls_rate
                case["grpc_loopback_Bps"] = grpc_rate
                case["grpc_floor_s"] = case["transfer_bytes_per_round"] / grpc_rate
                cases.append(case)
                print(
                    f"{p_text:>5} params x {n:2d} sites: round {case['round_s']:.2f} s "
                    f"(cycle {case['cycle_s']:.2f} s), peak {case['peak_rss'] / 2**20:.0f} MiB "
                    f"= idle + {case['peak_over_model']:.2f} x model; "
                    f"floors: numpy {case['numpy_floor_s']:.2f} s, "
                    f"raw {case['raw_floor_s']:.2f} s",
                    flush=True,
                )
                if case.get("verified"):
                    print("  " + case["verified"])
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
                if args.flower:
                    if flower_estimate(n, mb) > args.flower_max_bytes:
                        f = {
                            "params": params,
                            "sites": n,
                            "error": f"not run: about {flower_estimate(n, mb) / GB:.0f} GB "
                            f"expected (over --flower-max-bytes)",
                        }
                    else:
                        f = run_flower(params, n, args.rounds)
                    flower.append(f)
                    print(f"  flower: {json.dumps({k: v for k, v in f.items() if k != 'rss'})}")
    finally:
        if not args.keep:
            shutil.rmtree(work_root, ignore_errors=True)

    rows = []
    for c in cases:
        rows.append(
            [
                f"{c['params'] / 1e6:g}M",
                f"{c['model_bytes'] / 2**20:,.0f}",
                c["sites"],
                c["round_s"],
                c["cycle_s"],
                c["numpy_floor_s"],
                c["raw_floor_s"],
                f"{c['transfer_rate_Bps'] / 2**20:,.0f}",
                f"{c['raw_loopback_Bps'] / 2**20:,.0f}",
                f"{c['transfer_rate_Bps'] / c['raw_loopback_Bps']:.2f}",
                f"{c['tls_loopback_Bps'] / 2**20:,.0f}" if "tls_loopback_Bps" in c else "-",
                f"{c['transfer_rate_Bps'] / c['tls_loopback_Bps']:.2f}"
                if "tls_loopback_Bps" in c
                else "-",
                f"{c['grpc_loopback_Bps'] / 2**20:,.0f}" if "grpc_loopback_Bps" in c else "-",
                f"{c['transfer_rate_Bps'] / c['grpc_loopback_Bps']:.2f}"
                if "grpc_loopback_Bps" in c
                else "-",
                f"{c['idle_rss'] / 2**20:,.0f}",
                f"{c['peak_rss'] / 2**20:,.0f}",
                f"{c['peak_over_model']:.2f}",
            ]
        )
    print(
        table(
            [
                "params",
                "model MiB",
                "sites",
                "round s",
                "cycle s",
                "numpy s",
                "raw s",
                "MiB/s",
                "raw MiB/s",
                "of raw",
                "TLS MiB/s",
                "of TLS",
                "gRPC MiB/s",
                "of gRPC",
                "idle MiB",
                "peak MiB",
                "x model",
            ],
            rows,
        )
    )
    if flower:
        print(
            table(
                ["params", "sites", "round s", "server peak MiB", "x model", "note"],
                [
                    [
                        f"{f['params'] / 1e6:g}M",
                        f["sites"],
                        f.get("round_s", "-"),
                        f"{f['peak_rss'] / 2**20:,.0f}" if "peak_rss" in f else "-",
                        f"{f['peak_over_model']:.2f}" if "peak_over_model" in f else "-",
                        f.get("error", ""),
                    ]
                    for f in flower
                ],
            )
        )
    result = {
        "benchmark": "aggregation",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": finish_machine(info),
        "cases": cases,
        "flower": flower,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
