"""Bounded denial-of-service cases against a local staining endpoint, on loopback only.

Starts the endpoint (serve/config.yaml's application and proxy guard, one replica with Serve's
admission limits lowered to 8 ongoing and 8 queued requests, a small random generator in a
temporary MLflow registry) on 127.0.0.1 with a random token, then runs each case with a fixed
count and a time limit, and prints its statuses, its time and the resident memory of the replica
and of the HTTP proxy before the case and at its peak (VmHWM, reset before each case):

- stalled: 8 clients send headers and 1 KiB of a 1 MiB body, then stall (as many as the replica's
  max_ongoing_requests); 4 normal requests meanwhile;
- bomb: a ~150 KiB zlib TIFF that declares 8192x8192 pixels;
- chunked: a body without Content-Length, streamed 1 MiB at a time up to 300 MiB (--chunked-mib);
- overload: 32 normal requests at once, twice what the replica takes and queues;
- tiny: a 2x2 image; no_token: a request without the token; unknown_route: GET /v1/nothing;
- big_header: one unauthenticated header line of up to 64 MiB (--header-mib);
- slow_headers: 8 clients sending one header line every 0.5 s for 30 s;
- unauth_clients: 16 unauthenticated clients at once, each with a 1 MiB header;
- big_images: 4 authorised zlib TIFFs of 4096x4096 (16.8 megapixels each) at once, against the replica's
  pixel budget (replica_memory_mb 2048 at 60 bytes per pixel: 35.8 megapixels, so two at a time).
The header cases and big_images also time a normal GET /healthz and an authorised stain while they run ("normal ... s",
against "idle ... s" measured before the cases).

    python bench/abuse.py [--body-timeout 5]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import secrets
import select
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np

from results_file import write_result

HOST = "127.0.0.1"  # never anything else: these are attacks
PORT = 8767
ROUTE = "/v1/stain?setting=abuse&marker=dapi"


def tiff(array: np.ndarray, **options) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def post(path: str, body: bytes, token: str | None, method: str = "POST", timeout: float = 120) -> int | str:
    headers = {"Content-Type": "image/tiff", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"http://{HOST}:{PORT}{path}", data=body if method == "POST" else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        if error.code == 503:  # Serve's refusal: say whether it kept its Retry-After and the {"error"} shape
            shaped = error.read().startswith(b'{"error"')
            return f"503 retry-after={error.headers.get('retry-after')}{' json' if shaped else ' text'}"
        return error.code


def case_overload(token: str, body: bytes, count: int = 32) -> list:
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(count) as pool:
        statuses = list(pool.map(lambda _: post(ROUTE, body, token), range(count)))
    return [f"{status} x{n}" for status, n in sorted(Counter(map(str, statuses)).items())]


def raw_request(head: str) -> socket.socket:
    connection = socket.create_connection((HOST, PORT), timeout=60)
    connection.sendall(head.encode())
    return connection


def read_status(connection: socket.socket) -> int | str:
    try:
        line = connection.recv(4096).split(b"\r\n", 1)[0].decode()
        return int(line.split()[1]) if line.startswith("HTTP/") else f"no answer ({line[:30]!r})"
    except OSError as error:
        return f"closed ({type(error).__name__})"


def head(token: str, extra: str) -> str:
    return (f"POST {ROUTE} HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nContent-Type: image/tiff\r\n"
            f"Authorization: Bearer {token}\r\n{extra}\r\n")


def case_stalled(token: str, body: bytes) -> list:
    stalled = [raw_request(head(token, f"Content-Length: {2**20}\r\n")) for _ in range(8)]
    for connection in stalled:
        connection.sendall(b"\x00" * 1024)
    time.sleep(0.5)
    normal = []
    threads = [threading.Thread(target=lambda: normal.append(post(ROUTE, body, token))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answers = [read_status(connection) for connection in stalled]
    for connection in stalled:
        connection.close()
    return [f"normal {sorted(normal)}", f"stalled {sorted(map(str, answers))}"]


def case_chunked(token: str, mib: int) -> list:
    connection = raw_request(head(token, "Transfer-Encoding: chunked\r\n"))
    connection.settimeout(10)
    chunk = f"{2**20:x}\r\n".encode() + b"\x00" * 2**20 + b"\r\n"
    sent = 0
    for _ in range(mib):
        if select.select([connection], [], [], 0)[0]:  # the server answered: stop sending
            break
        try:
            connection.sendall(chunk)  # whole chunks only, so the framing stays valid
        except OSError:  # the server closed the connection after answering
            break
        sent += 1
    else:
        connection.sendall(b"0\r\n\r\n")
    status = read_status(connection)
    connection.close()
    return [status, f"{sent} MiB sent"]


def timed_normal(token: str, body: bytes) -> float:
    started = time.perf_counter()
    post(ROUTE, body, token)
    return time.perf_counter() - started


def while_running(attack, token: str, body: bytes) -> list:
    """Run `attack` (returns its outcome list) in a thread; meanwhile, after 0.5 s, time one normal request."""
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.extend(attack()))
    thread.start()
    time.sleep(0.5)
    normal_s = timed_normal(token, body)
    thread.join()
    return [*outcome, f"normal {normal_s:.2f} s"]


def big_images(token: str, body: bytes, count: int = 4) -> list:
    """`count` large images at once: each answer's status and seconds (the pixel budget queues what does not fit)."""
    results: list = [None] * count

    def one(index: int) -> None:
        started = time.perf_counter()
        results[index] = f"{post(ROUTE, body, token, timeout=600)} in {time.perf_counter() - started:.0f} s"

    threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def big_header(mib: int) -> list:
    connection = raw_request(f"GET /v1/models HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nX-Big: ")
    sent = 0
    for _ in range(mib):
        if select.select([connection], [], [], 0)[0]:
            break
        try:
            connection.sendall(b"a" * 2**20)
        except OSError:
            break
        sent += 1
    return [read_status(connection), f"{sent} MiB sent"]


def slow_headers(clients: int = 8, seconds: float = 30.0) -> list:
    connections = [raw_request(f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{PORT}\r\n") for _ in range(clients)]
    started, cut = time.monotonic(), [None] * clients
    while time.monotonic() - started < seconds and None in cut:
        for index, connection in enumerate(connections):
            if cut[index] is None:
                try:
                    if select.select([connection], [], [], 0)[0]:
                        cut[index] = time.monotonic() - started
                    else:
                        connection.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    cut[index] = time.monotonic() - started
        time.sleep(0.5)
    statuses = [read_status(c) if t is not None else "still open" for c, t in zip(connections, cut)]
    for connection in connections:
        connection.close()
    return [f"statuses {sorted(map(str, statuses))}", f"cut after {max((t for t in cut if t is not None), default=float('nan')):.1f} s"]


def unauthenticated_clients(count: int = 16) -> list:
    from concurrent.futures import ThreadPoolExecutor

    def one(_):
        connection = raw_request(f"POST {ROUTE} HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nX-Big: ")
        try:
            connection.sendall(b"a" * 2**20 + b"\r\n\r\n")
        except OSError:
            pass
        status = read_status(connection)
        connection.close()
        return status

    with ThreadPoolExecutor(count) as pool:
        return [f"statuses {sorted(map(str, pool.map(one, range(count))))}"]


def actor_pid(class_part: str) -> int | None:
    import ray
    from ray.util.state import list_actors

    # This benchmark's own Ray instance: others may run on the machine.
    for actor in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000):
        if class_part in (actor.class_name or ""):
            return actor.pid
    return None


def memory_mib(pid: int | None, field: str = "VmHWM") -> float | None:
    """The resident memory now (VmRSS) or at its peak (VmHWM) of a process, in MiB."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def reset_peak(pid: int | None) -> None:
    if pid is not None:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--body-timeout", type=float, default=5.0, help="body_timeout_s of the endpoint (config: 20)")
    parser.add_argument("--chunked-mib", type=int, default=300, help="most MiB the chunked case streams")
    parser.add_argument("--header-mib", type=int, default=64, help="most MiB the big_header case sends in one header line")
    parser.add_argument("--cases", nargs="*", default=None, help="run only these cases")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
    from lmadda.sweep.promotion import register_checkpoint
    from lmadda.models import GeneratorConfig, UNetGenerator
    from lmadda_serve.local import start_local

    root = Path(tempfile.mkdtemp(prefix="lmadda-abuse-"))
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(in_channels=1, out_channels=2, ngf=8, depth=8)).eval()
    path = save_checkpoint(root / "generator.pt", GeneratorCheckpoint(generator=generator, markers=["dapi", "cd29"], setting="abuse"))
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    register_checkpoint(tracking_uri, path, "dapi", "abuse", experiment="abuse")

    token = secrets.token_hex(16)
    os.environ["LMADDA_SERVE_TOKEN"] = token  # start_local hands the replicas its digest
    ray.init(num_cpus=args.num_cpus, log_to_driver=False)
    one_replica = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 1},
                   "max_ongoing_requests": 8, "max_queued_requests": 8}
    start_local(host=HOST, port=PORT, tracking_uri=tracking_uri, cache_dir=str(root / "cache"), body_timeout_s=args.body_timeout,
                max_in_flight=4, deployment=one_replica)
    image = tiff(np.random.default_rng(0).integers(0, 4000, size=(256, 256)).astype(np.uint16))
    assert post(ROUTE, image, token) == 200  # warm: the model is loaded before the cases
    replica, proxy = actor_pid("StainService"), actor_pid("ProxyActor")
    bomb = tiff(np.zeros((8192, 8192), np.uint16), compression="zlib", rowsperstrip=8192)
    spots = np.zeros((4096, 4096), np.uint16)
    spots[::64, ::64] = 3000  # compresses to a small body, as the issue's 33 KiB image did: the cost is in the pixels
    large = tiff(spots, compression="zlib")
    cases = {
        "stalled": lambda: case_stalled(token, image),
        "bomb": lambda: [post(ROUTE, bomb, token), f"{len(bomb) / 1024:.0f} KiB body"],
        "chunked": lambda: case_chunked(token, args.chunked_mib),
        "overload": lambda: case_overload(token, image),
        "tiny": lambda: [post(ROUTE, tiff(np.ones((2, 2), np.uint16)), token)],
        "no_token": lambda: [post(ROUTE, image, None)],
        "unknown_route": lambda: [post("/v1/nothing", b"", token, method="GET")],
        "big_header": lambda: while_running(lambda: big_header(args.header_mib), token, image),
        "slow_headers": lambda: while_running(slow_headers, token, image),
        "unauth_clients": lambda: while_running(unauthenticated_clients, token, image),
        "big_images": lambda: while_running(lambda: big_images(token, large), token, image),
    }
    idle_s = min(timed_normal(token, image) for _ in range(3))
    print(f"idle: a normal request takes {idle_s:.2f} s")
    record = {"date": date.today().isoformat(), "host": platform.node(), "body_timeout_s": args.body_timeout, "idle_normal_s": idle_s,
              "cases": {}}
    print(f"{'case':<14} {'seconds':>8} {'replica MiB before/peak':>24} {'proxy MiB before/peak':>22}  status")
    for name, run_case in cases.items():
        if args.cases and name not in args.cases:
            continue
        time.sleep(2)  # let the previous case drain (Serve keeps moving its body after the answer)
        reset_peak(replica)
        reset_peak(proxy)
        before = {"replica_mib": memory_mib(replica, "VmRSS"), "proxy_mib": memory_mib(proxy, "VmRSS")}
        started = time.perf_counter()
        outcome = run_case()
        seconds = time.perf_counter() - started
        row = {"outcome": [str(o) for o in outcome], "seconds": seconds, **before,
               "replica_peak_mib": memory_mib(replica), "proxy_peak_mib": memory_mib(proxy)}
        record["cases"][name] = row
        shown = lambda before, peak: f"{before or 0:.0f}/{peak or 0:.0f}" if peak is not None else "?"  # noqa: E731
        print(f"{name:<14} {seconds:8.2f} {shown(row['replica_mib'], row['replica_peak_mib']):>24} "
              f"{shown(row['proxy_mib'], row['proxy_peak_mib']):>22}  {'; '.join(row['outcome'])}", flush=True)
    serve.shutdown()
    ray.shutdown()
    print(f"-> {write_result(args.out, 'abuse', record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
