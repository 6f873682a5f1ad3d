"""server.worker.Engine: jobs that wait together with the same options are decoded in one pass."""

from __future__ import annotations

import time

from asr.audio.io import AudioFile, load_audio
from server.worker import Engine, Job
from tests.test_server_support import JFK, FakeModel, fake_loader


def _wait(jobs: list[Job], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for job in jobs:
        assert job.done.wait(max(0.0, deadline - time.monotonic())), job.state


def test_waiting_jobs_with_the_same_options_are_decoded_together():
    load, model = fake_loader(FakeModel(seconds_per_audio_s=0.05, step_s=0.5))
    engine = Engine(load, warmup=False, batch_size=3)
    engine.start()
    audio = load_audio(str(JFK))
    try:
        first = engine.submit(Job(source="first", audio=audio, duration_s=audio.duration_s))
        assert model.started.wait(10)  # the first runs alone; the rest queue behind it
        same = [engine.submit(Job(source=f"same{i}", audio=audio, duration_s=audio.duration_s)) for i in range(4)]
        other = engine.submit(Job(source="zh", audio=audio, duration_s=audio.duration_s, language="zh"))
        streamed = engine.submit(Job(source="file", audio=AudioFile.open(JFK), duration_s=audio.duration_s))
        cancelled = engine.submit(Job(source="gone", audio=audio, duration_s=audio.duration_s))
        engine.cancel(cancelled.id)
        jobs = [first, *same, other, streamed]
        _wait(jobs)
    finally:
        engine.stop()
    assert [j.state for j in jobs] == ["completed"] * len(jobs) and cancelled.state == "cancelled"
    assert model.many_calls == [3]  # three of the four alike (batch_size 3); the fourth ran alone
    assert [c["language"] for c in model.calls].count("zh") == 1
    assert all(j.result is not None and j.result.text.startswith("fake transcript") for j in jobs)
    assert all(len(j.segments) == 1 for j in jobs)  # streamed segments reach each job
