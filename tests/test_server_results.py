"""Results that fit a context: long transcripts in pages and as transcript:// resources, transcript files written
atomically beside the audio or into a folder, and what the server declares about itself. SDK in-memory client, both
protocol eras, a fake model that returns many segments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest
from mcp import Client

from asr.types import Segment, TranscriptionResult
from server.app import create_server
from server.config import Settings
from server.outputs import estimate_tokens, safe_stem, write_transcripts
from server.schemas import StatusOutput, TranscriptionOutput
from server.viewer import VIEWER_URI
from tests.test_server_support import FakeModel, fake_loader, write_wav

pytestmark = pytest.mark.anyio
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


class ManySegments(FakeModel):
    """A fake model whose transcript has one segment per second of audio, each a distinct sentence of ~40 tokens."""

    def transcribe(self, audio, **kwargs):
        base = super().transcribe(audio, **{**kwargs, "on_segment": None})
        n = max(1, int(base.timings.audio_duration_s))
        segs = [Segment(start=float(i), end=i + 1.0, text=f"S{i:04d} " + " ".join(WORDS[(i + k) % 16] for k in range(30)),
                        token_ids=[i]) for i in range(n)]
        for s in segs:
            if kwargs.get("on_segment"):
                kwargs["on_segment"](s)
        return base.model_copy(update={"segments": segs, "text": " ".join(s.text for s in segs)})


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=["auto", "legacy"])
def mode(request):
    return request.param


def make(root: Path, model: FakeModel | None = None, **settings):
    loader, model = fake_loader(model or ManySegments())
    settings.setdefault("allowed_roots", [root])
    return create_server(Settings(warmup=False, **settings), model_loader=loader), model


def out_of(result) -> TranscriptionOutput:
    assert not result.is_error, result.content
    return TranscriptionOutput.model_validate(result.structured_content)


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def test_a_long_transcript_comes_as_its_beginning_a_link_and_pages(tmp_path, mode):
    clip = write_wav(tmp_path / "talk.wav", 300.0)  # 300 segments of ~40 tokens: ~12k tokens in all
    server, _ = make(tmp_path, max_inline_tokens=4000)
    async with Client(server, mode=mode) as client:
        first = await client.call_tool("transcribe_file", {"path": str(clip), "include_segments": True})
        out = out_of(first)
        assert out.status == "completed" and not out.text_complete and out.segment_count == 300
        assert out.page.offset == 0 and 0 < out.page.count < 300 and out.page.next_offset == out.page.count
        assert estimate_tokens(out.text) <= 1100 and out.text.startswith("S0000 ")
        assert len(out.segments) == out.page.count
        text = text_of(first)
        assert len(text) < 10000 and f"offset={out.page.next_offset}" in text and "transcript://" in text
        links = [c for c in first.content if c.type == "resource_link"]
        assert {str(c.uri) for c in links} == {f"transcript://{out.job_id}/{f}" for f in ("txt", "srt", "vtt", "json")}
        assert len(json.dumps(first.structured_content)) < 12000  # the whole text is not repeated there

        # every page in turn gives back the whole transcript, nothing lost or repeated
        texts, offset, pages = [out.text], out.page.next_offset, 1
        while offset is not None:
            page = out_of(await client.call_tool("get_transcript", {"job_id": out.job_id, "offset": offset}))
            assert page.page.offset == offset and estimate_tokens(page.text) <= 4000
            texts.append(page.text)
            offset, pages = page.page.next_offset, pages + 1
        whole = (await client.read_resource(f"transcript://{out.job_id}/txt")).contents[0].text.strip()
        assert pages >= 4 and " ".join(texts) == whole
        assert [w for w in whole.split() if w.startswith("S")] == [f"S{i:04d}" for i in range(300)]
        small = out_of(await client.call_tool("get_transcript", {"job_id": out.job_id, "offset": 10, "limit": 3}))
        assert small.text.split()[0] == "S0010" and small.page.count == 3 and small.page.next_offset == 13
        past = await client.call_tool("get_transcript", {"job_id": out.job_id, "offset": 300})
        assert past.is_error and "past the end" in text_of(past)

        # the resources hold the whole, in four renditions
        srt = (await client.read_resource(f"transcript://{out.job_id}/srt")).contents[0].text
        assert srt.count(" --> ") == 300 and srt.startswith("1\n00:00:00,000 --> 00:00:01,000\nS0000")
        js = json.loads((await client.read_resource(f"transcript://{out.job_id}/json")).contents[0].text)
        assert len(js["segments"]) == 300
        with pytest.raises(Exception, match="no rendition"):
            await client.read_resource(f"transcript://{out.job_id}/docx")
        with pytest.raises(Exception, match="no transcription job"):
            await client.read_resource("transcript://000000000000/txt")


async def test_a_short_transcript_stays_whole(tmp_path, mode):
    clip = write_wav(tmp_path / "short.wav", 5.0)
    server, _ = make(tmp_path)
    async with Client(server, mode=mode) as client:
        r = await client.call_tool("transcribe_file", {"path": str(clip)})
    out = out_of(r)
    assert out.text_complete and out.page is None and out.segment_count == 5 and out.next_step is None
    assert out.transcript_uri == f"transcript://{out.job_id}/txt"
    assert [c.type for c in r.content] == ["text"]


async def test_transcript_files_are_written_beside_the_audio_and_never_overwrite(tmp_path, mode):
    clip = write_wav(tmp_path / "memo.wav", 3.0)
    (tmp_path / "memo.txt").write_text("the user's own notes")
    server, _ = make(tmp_path)
    async with Client(server, mode=mode) as client:
        out = out_of(await client.call_tool("transcribe_file", {"path": str(clip), "output_dir": "."}))
        assert sorted(Path(f).name for f in out.files) == ["memo (2).txt", "memo.json", "memo.srt", "memo.vtt"]
        assert (tmp_path / "memo.txt").read_text() == "the user's own notes"  # untouched
        assert (tmp_path / "memo (2).txt").read_text().strip() == out.text
        assert (tmp_path / "memo.srt").read_text().count(" --> ") == 3
        again = out_of(await client.call_tool("transcribe_file", {"path": str(clip), "output_dir": str(tmp_path)}))
        assert "memo (2).srt" in {Path(f).name for f in again.files}
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary left behind
        outside = await client.call_tool("transcribe_file", {"path": str(clip), "output_dir": "/etc"})
        assert outside.is_error and "outside the folders" in text_of(outside)
        missing = await client.call_tool("transcribe_file", {"path": str(clip), "output_dir": str(tmp_path / "no")})
        assert missing.is_error and "does not exist" in text_of(missing)


async def test_a_configured_output_folder_gets_every_transcript(tmp_path):
    audio, saved = tmp_path / "audio", tmp_path / "saved"
    audio.mkdir()
    saved.mkdir()
    clip = write_wav(audio / "call.wav", 2.0)
    server, _ = make(audio, output_dir=saved, output_formats=("srt",))
    async with Client(server) as client:
        out = out_of(await client.call_tool("transcribe_file", {"path": str(clip)}))
    assert out.files == [str(saved / "call.srt")] and os.listdir(saved) == ["call.srt"]


async def test_a_failed_write_is_reported_and_the_transcript_kept(tmp_path):
    clip = write_wav(tmp_path / "x.wav", 2.0)
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    server, _ = make(tmp_path)
    try:
        async with Client(server) as client:
            out = out_of(await client.call_tool("transcribe_file", {"path": str(clip), "output_dir": str(ro)}))
    finally:
        ro.chmod(0o700)
    if os.geteuid() == 0:  # root writes anyway: then the files are there
        assert len(out.files) == 4
    else:
        assert out.files == [] and out.text and any("could not be saved" in w for w in out.warnings)


def test_write_transcripts_is_atomic_and_no_clobber(tmp_path):
    result = TranscriptionResult(text="hi there", language="en", segments=[Segment(start=0, end=1, text="hi there")],
                                 finish_reason="stop")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = write_transcripts(fd, tmp_path, "a", result, ("txt", "vtt"))
        second = write_transcripts(fd, tmp_path, "a", result, ("txt",))
    finally:
        os.close(fd)
    assert [p.name for p in first] == ["a.txt", "a.vtt"] and [p.name for p in second] == ["a (2).txt"]
    assert sorted(os.listdir(tmp_path)) == ["a (2).txt", "a.txt", "a.vtt"]
    assert safe_stem("https://x/y/My Talk?.mp3") == "My Talk_" and safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("") == "transcript"


def test_token_estimate():
    assert estimate_tokens("word " * 100) == pytest.approx(125, rel=0.01)
    assert estimate_tokens("中文字" * 10) == 30


async def test_the_server_declares_what_it_is(tmp_path, mode):
    server, _ = make(tmp_path)
    async with Client(server, mode=mode) as client:
        info = client.server_info
        status = StatusOutput.model_validate((await client.call_tool("server_status", {})).structured_content)
        templates = (await client.list_resource_templates()).resource_templates
        tools = {t.name: t for t in (await client.list_tools()).tools}
        viewer = (await client.read_resource(VIEWER_URI)).contents[0]
    if mode == "legacy" or info is not None:  # the 2026-era server stamp is optional; the handshake always has it
        assert info.description and "speech-to-text" in info.description
        assert info.icons and info.icons[0].src.startswith("data:image/svg+xml;base64,")
    assert "2026-07-28" in status.protocol.revisions and "2025-11-25" in status.protocol.revisions
    assert status.protocol.negotiated in status.protocol.revisions
    assert any("stdio" in t for t in status.protocol.transports)
    assert [t.uri_template for t in templates] == ["transcript://{job_id}/{fmt}"]
    assert all(t.title for t in tools.values())
    # the transcript viewer (MCP Apps) renders the transcription tools' results
    for name in ("transcribe_file", "transcribe_url", "get_transcript"):
        assert tools[name].meta["ui"]["resourceUri"] == VIEWER_URI
    assert viewer.mime_type == "text/html;profile=mcp-app" and "<html" in viewer.text.lower()
    assert "io.modelcontextprotocol/ui" in status.protocol.extensions
    await anyio.sleep(0)
