"""`funasr-nano batch --ray [ADDRESS]`: the same batch job on Ray Data, over a pool of model replicas.

The driver lists the inputs and skips what is already done (asr.batch's resume rule); the rest becomes a Ray
dataset of file references, streamed through `map_batches` to an actor pool of `replicas` model replicas (each
loads the model once, then runs asr.batch.run_batch on its share: the same decode-ahead, files decoded together,
atomic outputs, state and failure records). Workers write the outputs themselves, so on a cluster of several
machines the output folder (and the inputs) must be on a filesystem every node mounts at the same path. The
driver streams the per-file outcomes back for the progress bar and the summary. Ray retries a replica that dies
(its files are then redone; outputs are atomic and idempotent), and a rerun of the command resumes.

`ray[data]` is an optional extra: `pip install "funasr-nano-mlx[ray]"`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .batch import BatchItem, BatchOptions, BatchSummary, load_state, up_to_date
from .errors import InvalidOptionError
from .writers import remove_stale_temps

log = logging.getLogger(__name__)


class _Replica:
    """One model replica (a Ray actor): loads the model once, transcribes the batches of files it is handed."""

    def __init__(self, model_kwargs: dict, options: dict, out_dir: str):
        from .loading.load import load_model  # noqa: PLC0415 - on the worker, once

        logging.basicConfig(level=logging.WARNING)
        self.model = load_model(**model_kwargs)
        self.options = BatchOptions(**{**options, "progress": False})
        self.out_dir = out_dir

    def __call__(self, batch: dict) -> dict:
        from .batch import run_batch

        items = [BatchItem(path=Path(p), rel=Path(r), language=lang or None, hotwords=tuple(h))
                 for p, r, lang, h in zip(batch["path"], batch["rel"], batch["language"], batch["hotwords"],
                                          strict=True)]
        outcome: dict[str, dict] = {}

        def on_result(item: BatchItem, result) -> None:
            outcome[str(item.path)] = {"status": "done", "audio_s": result.timings.audio_duration_s, "error": ""}

        summary = run_batch(self.model, items, self.out_dir, self.options, on_result=on_result, tidy=False)
        for f in summary.failures:
            outcome[f["input"]] = {"status": "failed", "audio_s": 0.0, "error": f"{f['error']}: {f['message']}"}
        rows = [outcome.get(str(it.path), {"status": "skipped", "audio_s": 0.0, "error": ""}) for it in items]
        return {"input": [str(it.path) for it in items], "status": [r["status"] for r in rows],
                "audio_s": [r["audio_s"] for r in rows], "error": [r["error"] for r in rows]}


def run_batch_ray(items: list[BatchItem], out_dir: str | os.PathLike, options: BatchOptions, *, model_kwargs: dict,
                  address: str | None = None, replicas: int = 1, gpus_per_replica: float = 0.0,
                  cpus_per_replica: float = 1.0, files_per_task: int | None = None) -> BatchSummary:
    """Transcribe `items` into `out_dir` on a Ray cluster (`address`, or a local one when None)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InvalidOptionError("--ray needs Ray Data: pip install 'funasr-nano-mlx[ray]' (or 'ray[data]')") from None
    if replicas < 1:
        raise InvalidOptionError(f"--replicas must be at least 1; got {replicas}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # once, here: a replica on another node could not tell a live writer's from a dead one's
    t0 = time.perf_counter()
    state = load_state(out)
    todo = [it for it in items if not up_to_date(it, state, out, options.formats)]
    summary = BatchSummary(files=len(items), skipped=len(items) - len(todo))
    if not todo:
        summary.wall_s = time.perf_counter() - t0
        return summary
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith(("FUNASR_NANO_", "HF_", "MLX_"))}})
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        rows = [{"path": str(it.path.resolve()), "rel": str(it.rel), "language": it.language or "",
                 "hotwords": list(it.hotwords)} for it in todo]
        per_task = files_per_task or max(1, min(options.batch_size, -(-len(rows) // replicas)))
        opts = {k: v for k, v in asdict(options).items() if k != "progress"}
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per_task))).map_batches(
            _Replica, batch_size=per_task, compute=ray.data.ActorPoolStrategy(size=replicas),
            num_gpus=gpus_per_replica or None, num_cpus=cpus_per_replica,
            fn_constructor_kwargs={"model_kwargs": model_kwargs, "options": opts, "out_dir": str(out)},
            batch_format="numpy")
        bar = None
        if options.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(rows), unit="file", file=sys.stderr, dynamic_ncols=True)
        for row in ds.iter_rows():
            if row["status"] == "done":
                summary.done += 1
                summary.audio_s += float(row["audio_s"])
            elif row["status"] == "failed":
                summary.failed += 1
                summary.failures.append({"input": row["input"], "message": row["error"]})
            else:  # done meanwhile (by a retried replica, or another run)
                summary.skipped += 1
            if bar is not None:
                wall = time.perf_counter() - t0
                bar.set_postfix_str(f"{summary.audio_s / 3600:.2f} h audio, RTFx {summary.audio_s / wall:.1f}, "
                                    f"{summary.failed} failed", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        if started_here:
            ray.shutdown()
    summary.wall_s = time.perf_counter() - t0
    return summary
