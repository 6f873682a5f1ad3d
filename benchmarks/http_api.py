"""The HTTP API's cost beyond inference, and what batching concurrent requests buys.

Starts `funasr-nano serve`'s app in this process (uvicorn on a free loopback port, the model loaded and warmed up
as the server does), then:

1. overhead: --requests sequential uploads of each short clip (verbose_json); per request, the client's wall time
   minus the server's processing time of the transcription (upload, multipart parsing, audio decoding, queueing,
   JSON, HTTP). Median and 90th percentile, measured with curl (`-w %{time_total}`: it sets TCP_NODELAY) and with
   httpx (the OpenAI SDK's transport), whose request body, sent after its headers without TCP_NODELAY, can wait
   out the receiver's delayed ACK (~40 ms on Linux) - a client-side cost the server cannot remove.
2. throughput: for each --concurrency C, C uploads at once (the clips in turn) against the same C one after the
   other; RTFx = seconds of audio / wall seconds, and how many requests the engine decoded together.

    python -m benchmarks.http_api --model DIR [--dtype bfloat16] [--max-new-tokens 32] [--concurrency 1 4 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTDATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "audio"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backend", default="auto", choices=["auto", "mlx", "cpu", "cuda"])
    ap.add_argument("--clips", nargs="+", default=[str(TESTDATA / "en" / "jfk.wav"),
                                                   str(TESTDATA / "zh" / "example_zh.wav")])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=10, help="sequential requests per clip for the overhead")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import httpx2 as httpx
    import soundfile as sf
    import uvicorn

    import asr  # noqa: F401  (first: picks the BLAS before MLX loads)
    from server.config import HttpSettings, Settings
    from server.http import create_app

    settings = Settings(model=a.model, dtype=a.dtype, backend=a.backend, max_new_tokens=a.max_new_tokens,
                        batch_size=a.batch_size, queue_size=max(64, max(a.concurrency)))
    batches: list[int] = []

    class Counting:
        """The loaded model, counting how many requests each pass decoded together."""

        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def transcribe_many(self, audios, **kw):
            batches.append(len(audios))
            return self.model.transcribe_many(audios, **kw)

    def loader():
        from server.intake import default_loader

        return Counting(default_loader(settings)())

    app = create_app(settings, HttpSettings(port=0, mcp=False), model_loader=loader)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    t0 = time.perf_counter()
    while app.state.engine.state not in ("ready", "failed"):
        time.sleep(0.05)
    if app.state.engine.state == "failed":
        raise SystemExit(app.state.engine.error)
    out: dict = {"load_and_warmup_s": round(time.perf_counter() - t0, 2), "compute": app.state.engine.info.compute,
                 "max_new_tokens": a.max_new_tokens}
    clips = [(Path(c).name, Path(c).read_bytes(), sf.info(c).duration) for c in a.clips]
    url = f"{base}/v1/audio/transcriptions"

    def post(name: str, data: bytes) -> tuple[float, dict]:
        t = time.perf_counter()
        r = httpx.post(url, files={"file": (name, data)}, data={"response_format": "verbose_json"}, timeout=600)
        wall = time.perf_counter() - t
        r.raise_for_status()
        return wall, r.json()

    for name, data, _ in clips:  # warm this clip's shapes
        post(name, data)
    def curl(path: str) -> tuple[float, dict]:
        r = subprocess.run(["curl", "-sS", "-w", "\n%{time_total}", "-F", f"file=@{path}", "-F",
                            "response_format=verbose_json", url], capture_output=True, text=True, check=True)
        body, _, total = r.stdout.rpartition("\n")
        return float(total), json.loads(body)

    def summary(rows: list[float]) -> dict:
        rows = sorted(rows)
        return {"median_ms": round(statistics.median(rows), 2), "p90_ms": round(rows[int(0.9 * (len(rows) - 1))], 2),
                "requests": len(rows)}

    overhead: dict = {}
    for (name, data, _), path in zip(clips, a.clips, strict=True):
        for client, send in (("curl", lambda p=path: curl(p)), ("httpx", lambda n=name, d=data: post(n, d))):
            if client == "curl" and shutil.which("curl") is None:
                continue
            rows = []
            for _ in range(a.requests):
                wall, body = send()
                rows.append((wall - body["timings"]["processing_s"]) * 1000)
            overhead[f"{name} ({client})"] = summary(rows)
    out["overhead"] = overhead

    out["throughput"] = []
    for c in a.concurrency:
        work = [clips[i % len(clips)] for i in range(c)]
        audio_s = sum(d for _, _, d in work)
        t = time.perf_counter()
        for name, data, _ in work:
            post(name, data)
        sequential = time.perf_counter() - t
        batches.clear()
        t = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            list(pool.map(lambda w: post(w[0], w[1]), work))
        concurrent = time.perf_counter() - t
        out["throughput"].append({
            "concurrency": c, "audio_s": round(audio_s, 2), "sequential_s": round(sequential, 3),
            "concurrent_s": round(concurrent, 3), "rtfx_sequential": round(audio_s / sequential, 2),
            "rtfx_concurrent": round(audio_s / concurrent, 2), "speedup": round(sequential / concurrent, 2),
            "decoded_together": list(batches)})
    server.should_exit = True
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
