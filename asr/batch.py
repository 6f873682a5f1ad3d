"""Transcribe whole archives: folders and manifests, resumable, with failures recorded and never fatal.

    from asr.batch import BatchOptions, discover, run_batch
    items = discover(["~/podcasts"])                     # or discover([], manifest="list.jsonl")
    summary = run_batch(model, items, Path("out"), BatchOptions(formats=("txt", "srt")))

One output per input in each format, mirroring the input folders under the output folder, each written atomically
(a temporary file, then a rename: a reader or a rerun never sees half a transcript). A rerun skips every input whose
outputs exist and whose size and modification time match what was transcribed (`.funasr-nano-batch.jsonl` in the
output folder records them, a line per finished input, flushed as it goes). A file that fails is recorded in
`failures.jsonl` with its typed error and the run goes on.

Files are opened and decoded ahead on `workers` threads while the model thread decodes: consecutive inputs with the
same language and hotwords are transcribed together (`FunASRNano.transcribe_many`: their segments share decode
batches, so folders of short clips fill a batch), files longer than STREAM_ABOVE_S or of unknown length one at a
time through the streaming path.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .audio.io import Audio, AudioFile, decode_or_stream
from .errors import ASRError, InvalidOptionError
from .types import BATCH_SIZE_DEFAULT, TranscriptionResult
from .writers import FORMATS, remove_stale_temps, render, write_atomic

log = logging.getLogger(__name__)

STATE_FILE = ".funasr-nano-batch.jsonl"
FAILURES_FILE = "failures.jsonl"
AUDIO_EXTENSIONS = frozenset({
    "wav", "flac", "mp3", "m4a", "m4b", "aac", "ogg", "oga", "opus", "webm", "mp4", "m4v", "mov", "mkv", "mka",
    "wma", "aif", "aiff", "caf", "amr", "ac3", "3gp", "avi", "wv",
})


@dataclass(frozen=True)
class BatchItem:
    """One input: its path, where its outputs go (relative, without suffix), and per-file options."""

    path: Path
    rel: Path
    language: str | None = None
    hotwords: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchOptions:
    formats: tuple[str, ...] = ("txt",)
    language: str | None = None  # for items that do not set their own
    hotwords: tuple[str, ...] = ()
    itn: bool = True
    batch_size: int = BATCH_SIZE_DEFAULT
    max_new_tokens: int = 512
    workers: int = 2  # decode-ahead threads
    progress: bool = True
    speakers: int | str | None = None  # who spoke when ('auto' or a number; the model needs a speaker model)

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise InvalidOptionError(f"output formats must be among {', '.join(FORMATS)}; got {list(self.formats)}")
        if self.workers < 1:
            raise InvalidOptionError(f"workers must be at least 1; got {self.workers}")


@dataclass
class BatchSummary:
    files: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def rtfx(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        return (f"{self.files} file(s): {self.done} transcribed, {self.skipped} already done, {self.failed} failed; "
                f"{self.audio_s / 3600:.2f} h of audio in {self.wall_s:.1f} s (RTFx {self.rtfx:.1f})")


# ---- inputs ----------------------------------------------------------------------------------------------------
def discover(inputs: Iterable[str | os.PathLike], manifest: str | os.PathLike | None = None) -> list[BatchItem]:
    """The inputs as items: files as given, folders walked (audio/video files by extension, hidden ones skipped),
    manifest entries (JSONL objects or CSV rows with `path` and optional `language`, `hotwords`). Output names
    mirror the folders; clashes get a numbered suffix."""
    inputs = [Path(os.path.expanduser(str(p))) for p in inputs]
    items: list[BatchItem] = []
    single_dir = len(inputs) == 1 and inputs[0].is_dir() and manifest is None
    for root in inputs:
        if root.is_dir():
            for path in _walk(root):
                rel = path.relative_to(root) if single_dir else Path(root.name) / path.relative_to(root)
                items.append(BatchItem(path=path, rel=rel.with_suffix("")))
        elif root.exists():
            items.append(BatchItem(path=root, rel=Path(root.stem)))
        else:
            raise InvalidOptionError(f"{root} does not exist; pass audio files, folders or --manifest")
    if manifest is not None:
        items += _read_manifest(Path(manifest))
    seen: dict[Path, int] = {}
    out = []
    for item in items:
        n = seen.get(item.rel, 0) + 1
        seen[item.rel] = n
        out.append(item if n == 1 else BatchItem(item.path, item.rel.with_name(f"{item.rel.name} ({n})"),
                                                 item.language, item.hotwords))
    return out


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in AUDIO_EXTENSIONS:
                yield Path(dirpath) / name


def _read_manifest(manifest: Path) -> list[BatchItem]:
    try:
        text = manifest.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidOptionError(f"cannot read the manifest {manifest}: {exc.strerror or exc}") from None
    if manifest.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidOptionError(f"{manifest}:{n}: not a JSON object ({exc.msg}); one object per line, "
                                             'e.g. {"path": "a.wav", "language": "en"}') from None
                rows.append(row if isinstance(row, dict) else {"path": None})
    base = manifest.parent
    items = []
    for n, row in enumerate(rows, start=1):
        raw = row.get("path")
        if not raw or not isinstance(raw, str):
            raise InvalidOptionError(f"{manifest}: entry {n} has no 'path'")
        path = Path(os.path.expanduser(raw))
        path = path if path.is_absolute() else base / path
        hot = row.get("hotwords") or ()
        hot = tuple(w.strip() for w in (hot.split(",") if isinstance(hot, str) else hot) if str(w).strip())
        try:
            rel = path.resolve().relative_to(base.resolve())
        except ValueError:
            rel = Path(path.name)
        items.append(BatchItem(path=path, rel=rel.with_suffix(""), language=row.get("language") or None,
                               hotwords=hot))
    return items


# ---- state -----------------------------------------------------------------------------------------------------
def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def load_state(out_dir: Path) -> dict[str, dict]:
    """The finished inputs recorded in `out_dir` (a torn last line, from a run killed while writing it, is ignored)."""
    state = {}
    try:
        lines = (out_dir / STATE_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return state
    for line in lines:
        try:
            entry = json.loads(line)
            state[entry["input"]] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return state


def up_to_date(item: BatchItem, state: dict[str, dict], out_dir: Path, formats: tuple[str, ...]) -> bool:
    entry = state.get(str(item.path.resolve()))
    if entry is None:
        return False
    try:
        size, mtime = _stamp(item.path)
    except OSError:
        return False
    return (entry.get("size") == size and entry.get("mtime_ns") == mtime
            and all((out_dir / _output(item, fmt)).is_file() for fmt in formats))


def _output(item: BatchItem, fmt: str) -> Path:
    return item.rel.with_name(f"{item.rel.name}.{fmt}")


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- the run ---------------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    item: BatchItem
    audio: Audio | AudioFile | None = None  # in memory, or (long / unknown length) the opened file to stream
    stamp: tuple[int, int] = (0, 0)
    error: BaseException | None = None

    @property
    def streamed(self) -> bool:
        return isinstance(self.audio, AudioFile)


def _load(item: BatchItem) -> _Loaded:
    """Open once, stamp (size, mtime) from that descriptor, decode in memory unless long (runs on a worker)."""
    try:
        file = AudioFile.open(item.path)
        st = os.fstat(file.fd)
        stamp = (st.st_size, st.st_mtime_ns)
        audio = decode_or_stream(file)
        if audio is file:
            return _Loaded(item, file, stamp)
        file.close()
        return _Loaded(item, audio, stamp)
    except BaseException as exc:  # noqa: BLE001 - recorded as this file's failure
        return _Loaded(item, error=exc)


def run_batch(model, items: list[BatchItem], out_dir: str | os.PathLike, options: BatchOptions = BatchOptions(),
              on_result: Callable[[BatchItem, TranscriptionResult], None] | None = None, *,
              tidy: bool = True) -> BatchSummary:
    """Transcribe `items` into `out_dir` (see the module docstring); returns the counts and the throughput.
    tidy: first delete the temporary files a killed earlier run left in `out_dir` (asr.writers.remove_stale_temps);
    Ray replicas leave that to their driver."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tidy:
        remove_stale_temps(out)
    t0 = time.perf_counter()
    state = load_state(out)
    todo = [it for it in items if not up_to_date(it, state, out, options.formats)]
    summary = BatchSummary(files=len(items), skipped=len(items) - len(todo))
    bar = _progress_bar(len(todo), options.progress)

    def finish(loaded: _Loaded, result: TranscriptionResult) -> None:
        item = loaded.item
        paths = []
        for fmt in options.formats:
            dest = out / _output(item, fmt)
            write_atomic(dest, render(result, fmt))
            paths.append(str(_output(item, fmt)))
        duration = result.timings.audio_duration_s
        _append(out / STATE_FILE, {"input": str(item.path.resolve()), "size": loaded.stamp[0],
                                   "mtime_ns": loaded.stamp[1], "outputs": paths, "audio_s": round(duration, 3)})
        summary.done += 1
        summary.audio_s += duration
        if on_result is not None:
            on_result(item, result)
        for warning in result.warnings:
            log.warning("%s: %s", item.path, warning)
        _tick(bar, summary, t0)

    def fail(item: BatchItem, exc: BaseException) -> None:
        record = {"input": str(item.path), "error": type(exc).__name__, "message": str(exc),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if not isinstance(exc, ASRError):
            log.error("%s: unexpected %s", item.path, type(exc).__name__, exc_info=exc)
        _append(out / FAILURES_FILE, record)
        summary.failed += 1
        summary.failures.append(record)
        _tick(bar, summary, t0)

    def group_key(loaded: _Loaded) -> tuple:
        it = loaded.item
        return (it.language or options.language, it.hotwords or options.hotwords)

    def transcribe_group(group: list[_Loaded]) -> None:
        language, hotwords = group_key(group[0])
        kwargs = dict(language=language, hotwords=list(hotwords) or None, itn=options.itn,
                      max_new_tokens=options.max_new_tokens, batch_size=options.batch_size)
        if options.speakers is not None:  # diarized one file at a time
            kwargs["speakers"] = options.speakers
        if len(group) == 1:
            g = group[0]
            try:
                result = model.transcribe(g.audio, **kwargs)
            except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                fail(g.item, exc)
            else:
                finish(g, result)
            finally:
                if g.streamed:
                    g.audio.close()
            return
        try:
            results = model.transcribe_many([g.audio for g in group], **kwargs)
        except Exception:  # noqa: BLE001 - one bad file must not sink the others: one by one, to find it
            for g in group:
                transcribe_group([g])
            return
        for g, result in zip(group, results, strict=True):
            finish(g, result)

    with ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="funasr-batch-decode") as pool:
        window = max(options.batch_size, options.workers) * 2  # decoded inputs held ahead, at most
        futures: list[Future[_Loaded]] = [pool.submit(_load, it) for it in todo[:window]]
        nxt = len(futures)
        pending: list[_Loaded] = []
        try:
            while futures or pending:
                # take what is decoded, in order; a group ends at a change of options, a streamed file, or full
                while futures and (futures[0].done() or not pending):
                    loaded = futures.pop(0).result()
                    if nxt < len(todo):
                        futures.append(pool.submit(_load, todo[nxt]))
                        nxt += 1
                    if loaded.error is not None:
                        fail(loaded.item, loaded.error)
                        continue
                    if pending and (loaded.streamed or group_key(loaded) != group_key(pending[0])):
                        transcribe_group(pending)
                        pending = []
                    pending.append(loaded)
                    if loaded.streamed or len(pending) >= options.batch_size or options.speakers is not None:
                        break
                if pending:
                    transcribe_group(pending)
                    pending = []
        except BaseException:
            for f in futures:
                f.cancel()
            for g in pending:
                if g.streamed:
                    g.audio.close()
            raise
        finally:
            summary.wall_s = time.perf_counter() - t0
            if bar is not None:
                bar.close()
    return summary


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _tick(bar, summary: BatchSummary, t0: float) -> None:
    if bar is None:
        return
    wall = time.perf_counter() - t0
    bar.set_postfix_str(f"{summary.audio_s / 3600:.2f} h audio, RTFx {summary.audio_s / wall if wall else 0:.1f}, "
                        f"{summary.failed} failed", refresh=False)
    bar.update(1)
