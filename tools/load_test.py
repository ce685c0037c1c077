"""Load-test `nmt serve` on loopback, and compare with batch translation of the same sentences.

    python tools/load_test.py --model RUN_DIR|CHECKPOINT [--input FILE] [--clients 8]
                              [--duration 20] [--sentences-per-request 1] [--beam-size N]
                              [--max-batch 64] [--max-wait-ms 10] [--url URL] [--json OUT]

Starts `nmt serve --port 0` with the model (or uses a running server given by --url,
which must be on loopback), then N client threads each send POST /translate requests
one after another over a kept-alive connection, for a bounded time, cycling through the
input sentences. Prints requests/s, sentences/s, latency percentiles (p50, p95, p99),
errors, and the mean number of sentences per decoding batch that the server reports.

Then, with the server stopped, translates the same sentences the way `nmt translate`
does (`translate_stream`, the same options, model already loaded) and prints its
sentences/s and how many of the server's translations are identical to it.
Input: `--input FILE`, else the run folder's first test split. Torch threads follow the
environment (OMP_NUM_THREADS) for both.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from nmt.checkpoint import load_model
from nmt.runs import data_dir_of, resolve_model, run_dir_of, test_splits_of
from nmt.translate import SearchOptions, Translator, translate_stream

LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def start_server(model: str, max_batch: int, max_wait_ms: float, max_sentences: int, log: Path):
    """`nmt serve` on a free loopback port; returns (process, base URL) once it accepts requests."""
    command = [
        sys.executable, "-m", "nmt", "serve", "--model", model, "--port", "0", "--max-batch", str(max_batch),
        "--max-wait-ms", str(max_wait_ms), "--max-sentences", str(max_sentences),
    ]
    with open(log, "w") as err:  # a file, not a pipe: the access log must never block the server
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "Application startup complete" in text:
            url = text.split("serving on ")[1].split()[0]
            return server, url
        if server.poll() is not None:
            raise SystemExit(f"error: nmt serve exited with {server.returncode}:\n{text}")
        time.sleep(0.1)
    server.kill()
    raise SystemExit("error: nmt serve did not start within 300 s")


class Client(threading.Thread):
    """Sends requests one after another until the deadline; records latency and answers."""

    def __init__(self, url: str, chunks, lock: threading.Lock, options: dict, deadline: float):
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        self.chunks, self.lock, self.options, self.deadline = chunks, lock, options, deadline
        self.latencies: list[float] = []
        self.sentences = 0
        self.errors: list[str] = []
        self.answers: dict[int, str] = {}

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            with self.lock:
                indices, lines = next(self.chunks)
            body = json.dumps({"text": lines, **self.options})
            start = time.perf_counter()
            try:
                self.conn.request("POST", "/translate", body, {"content-type": "application/json"})
                response = self.conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                self.conn.close()
                continue
            elapsed = time.perf_counter() - start
            if response.status != 200:
                self.errors.append(f"HTTP {response.status}: {data[:200]!r}")
                continue
            self.latencies.append(elapsed)
            self.sentences += len(lines)
            for i, text in zip(indices, json.loads(data)["translations"]):
                self.answers.setdefault(i, text)
        self.conn.close()


def get_json(url: str, path: str) -> dict:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def drive(url: str, sentences: list[str], *, clients: int, duration: float, per_request: int, options: dict) -> dict:
    """N clients for `duration` seconds; the figures, and the first answer per sentence index."""
    numbered = list(enumerate(sentences))
    requests = ([i for i, _ in numbered[k : k + per_request]] for k in itertools.cycle(range(0, len(numbered), per_request)))
    chunks = ((idx, [sentences[i] for i in idx]) for idx in requests)
    lock = threading.Lock()
    Client(url, chunks, lock, options, time.monotonic() + 1.0).run()  # warm-up, untimed
    before = get_json(url, "/health")["served"]
    start = time.monotonic()
    threads = [Client(url, chunks, lock, options, start + duration) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    served = get_json(url, "/health")["served"]
    latencies = np.array([x for t in threads for x in t.latencies]) * 1000
    answers: dict[int, str] = {}
    for t in threads:
        for i, text in t.answers.items():
            answers.setdefault(i, text)
    batches = served["batches"] - before["batches"]
    return {
        "clients": clients,
        "sentences_per_request": per_request,
        "seconds": round(wall, 2),
        "requests": int(latencies.size),
        "errors": sum(len(t.errors) for t in threads),
        "first_errors": [e for t in threads for e in t.errors][:3],
        "requests_per_s": round(latencies.size / wall, 2),
        "sentences_per_s": round(sum(t.sentences for t in threads) / wall, 2),
        "latency_ms": {
            f"p{q}": round(float(np.percentile(latencies, q)), 1) if latencies.size else None for q in (50, 95, 99)
        },
        "mean_batch": round((served["sentences"] - before["sentences"]) / batches, 2) if batches else None,
        "answers": answers,
    }


def batch_baseline(model: str, sentences: list[str], *, beam_size: int | None, batch_size: int) -> dict:
    """`nmt translate`'s path (translate_stream) on the same sentences, model already loaded."""
    loaded = load_model(resolve_model(model), "cpu")
    opts = SearchOptions.from_recipe(loaded.recipe.decode, beam_size=beam_size, batch_size=batch_size)
    translator = Translator(loaded, opts, "cpu")
    out = io.StringIO()
    start = time.perf_counter()
    translate_stream(translator, sentences, out)
    seconds = time.perf_counter() - start
    return {
        "sentences": len(sentences),
        "seconds": round(seconds, 2),
        "sentences_per_s": round(len(sentences) / seconds, 2),
        "translations": out.getvalue().splitlines(),
    }


def default_input(model: str) -> Path:
    run_dir = run_dir_of(Path(model))
    splits = test_splits_of(run_dir)
    if not splits:
        raise SystemExit(f"error: no test split in {data_dir_of(run_dir)}; pass --input FILE")
    return data_dir_of(run_dir) / f"{splits[0]}.src.txt"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run folder or checkpoint")
    parser.add_argument("--input", type=Path, help="sentences, one per line [default: the run's first test split]")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--sentences-per-request", type=int, default=1)
    parser.add_argument("--beam-size", type=int, help="beam size of every request [default: the model's recipe]")
    parser.add_argument("--max-batch", type=int, default=64, help="server's --max-batch, and the baseline's batch size")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="server's --max-wait-ms")
    parser.add_argument("--url", help="use this running server (loopback only) instead of starting one")
    parser.add_argument("--no-baseline", action="store_true", help="skip the batch-translation comparison")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.sentences_per_request < 1:
        parser.error("--clients, --duration and --sentences-per-request must be positive")
    if args.url and not (urlsplit(args.url).hostname or "").startswith(LOOPBACK):
        parser.error("--url must be a loopback address (127.x, localhost, ::1)")

    source = args.input or default_input(args.model)
    sentences = [line.rstrip("\n") for line in source.read_text(encoding="utf-8").splitlines()]
    options = {} if args.beam_size is None else {"beam_size": args.beam_size}
    print(f"load test: {len(sentences)} sentences from {source}, {args.clients} clients, {args.duration:g} s",
          file=sys.stderr)

    server = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                url = args.url.rstrip("/")
            else:
                server, url = start_server(args.model, args.max_batch, args.max_wait_ms,
                                           max(100, args.sentences_per_request), Path(tmp) / "server.log")
            load = drive(url, sentences, clients=args.clients, duration=args.duration,
                         per_request=args.sentences_per_request, options=options)
        finally:
            if server is not None:
                server.send_signal(signal.SIGINT)
                server.wait(60)
    answers = load.pop("answers")
    result = {"server": load}
    if not args.no_baseline:
        batch = batch_baseline(args.model, sentences, beam_size=args.beam_size, batch_size=args.max_batch)
        reference = batch.pop("translations")
        same = sum(reference[i] == text for i, text in answers.items())
        result["batch"] = {**batch, "served_sentences_compared": len(answers), "identical": same}
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(result: dict) -> str:
    s = result["server"]
    lat = s["latency_ms"]
    lines = [
        f"server   {s['clients']} clients x {s['sentences_per_request']} sentence(s)/request, {s['seconds']} s: "
        f"{s['requests_per_s']} requests/s, {s['sentences_per_s']} sentences/s",
        f"latency  p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms; "
        f"{s['requests']} requests, {s['errors']} errors; {s['mean_batch']} sentences per decoding batch",
    ]
    if "batch" in result:
        b = result["batch"]
        lines.append(
            f"batch    translate_stream (as `nmt translate`): {b['sentences']} sentences in {b['seconds']} s, "
            f"{b['sentences_per_s']} sentences/s; server/batch {s['sentences_per_s'] / b['sentences_per_s']:.2f}"
        )
        lines.append(f"outputs  {b['identical']} of {b['served_sentences_compared']} served translations identical to batch")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
