"""Command line: `funasr-nano transcribe FILE... [options]` and `funasr-nano languages`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from . import languages as langs
from .errors import ASRError, InvalidOptionError
from .loading.checkpoint import DEFAULT_REPO
from .loading.load import load_model
from .options import BACKENDS, RuntimeOptions, parse_speakers
from .types import BATCH_SIZE_DEFAULT, BATCH_SIZE_MAX
from .writers import FORMATS, render


def _model_options(p: argparse.ArgumentParser) -> None:
    """The model and decoding options `transcribe` and `batch` share."""
    p.add_argument("-m", "--model", default=os.environ.get("FUNASR_NANO_MODEL", DEFAULT_REPO),
                   help="model directory (official or converted) or Hugging Face repo id")
    p.add_argument("-l", "--language", default="auto", help="language code/name, or 'auto' (see `languages`)")
    p.add_argument("--hotwords", "--hotword", action="append", default=[],
                   help="a word to favour (repeatable, or comma-separated)")
    p.add_argument("--no-itn", action="store_true", help="ask for verbatim text without inverse text normalisation")
    p.add_argument("--dtype", default="auto", help="LLM dtype: auto (bfloat16; float32 on a CPU without numba), bfloat16, "
                   "float32, float16")
    p.add_argument("--encoder-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="audio encoder dtype: float32 (default) or bfloat16 (faster on GPUs and with MKL on CPUs)")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the LLM to 4 or 8 bits")
    p.add_argument("--max-new-tokens", type=int, default=512, help="cap on generated tokens per segment")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE_DEFAULT,
                   help=f"segments of long audio decoded together, 1-{BATCH_SIZE_MAX} (fewer hold less memory)")
    p.add_argument("--variant", choices=("nano", "mlt"), help="override the detected model variant")
    p.add_argument("--backend", choices=BACKENDS, default=os.environ.get("FUNASR_NANO_BACKEND", "auto"),
                   help="what computes: mlx (MLX's operations; Apple Silicon), cpu (NumPy + BLAS runners), cuda "
                   "(CUDA kernels), or auto")
    p.add_argument("--speakers", type=_speakers, help="who spoke when: 'auto' or the number of speakers (needs "
                   "--speaker-model); segments and outputs then carry S1, S2, ... (batch: files are then transcribed "
                   "one at a time)")
    p.add_argument("--speaker-model", help="CAM++ speaker model: a folder of iic/speech_campplus_sv_zh-cn_16k-common "
                   "or a Hugging Face id")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and timings to stderr")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="funasr-nano", description="Fun-ASR-Nano speech recognition on MLX",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio files", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("files", nargs="+", help="audio/video files (wav, flac, mp3, ogg, m4a, mp4, webm, opus, ...)")
    _model_options(t)
    t.add_argument("-f", "--format", choices=FORMATS, default="txt", help="output format")
    t.add_argument("-o", "--output-dir", help="write FILE.<format> there instead of printing to stdout")

    b = sub.add_parser("batch", help="transcribe folders or a manifest into an output folder, resumably",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("inputs", nargs="*", help="audio/video files and folders (walked for audio/video files)")
    b.add_argument("-o", "--output-dir", required=True, help="where the transcripts go (mirroring the folders), "
                   "with .funasr-nano-batch.jsonl (what is done, for resuming) and failures.jsonl")
    b.add_argument("--manifest", help="a JSONL (one {\"path\", \"language\", \"hotwords\"} object a line) or CSV "
                   "(columns path, language, hotwords) list of inputs; relative paths are from its folder")
    b.add_argument("-f", "--format", nargs="+", choices=FORMATS, default=["txt"], help="output formats")
    b.add_argument("--workers", type=int, default=2, help="threads decoding audio ahead of the model")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a local Ray cluster, or the one at ADDRESS (e.g. auto, ray://host:10001); "
                   "the inputs and the output folder must be on storage every node sees (pip install "
                   "'funasr-nano-mlx[ray]')")
    b.add_argument("--replicas", type=int, default=1, help="with --ray: model replicas (Ray actors)")
    b.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs per replica")
    b.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --ray: CPU slots per replica")
    _model_options(b)
    sub.add_parser("serve", add_help=False, help="serve the model over HTTP: OpenAI-compatible transcription API, "
                   "health, metrics and MCP (see `funasr-nano serve --help`)")
    lg = sub.add_parser("languages", help="list supported languages")
    lg.add_argument("--variant", choices=("nano", "mlt"), default="nano")
    return p


def _load(args: argparse.Namespace):
    """The model, after checking the language (against its variant, or both where not given) before loading."""
    _load_checks(args)
    model = load_model(**_model_kwargs(args))
    langs.resolve(args.language, model.variant)
    return model


def _model_kwargs(args: argparse.Namespace) -> dict:
    """load_model's arguments from the command line (also what Ray replicas load with)."""
    return dict(path_or_repo=args.model, dtype=args.dtype, quantize=args.quantize, variant=args.variant,
                encoder_dtype=args.encoder_dtype, speaker_model=args.speaker_model,
                runtime=replace(RuntimeOptions.from_env(), backend=args.backend))


def _load_checks(args: argparse.Namespace) -> None:
    """What can be checked before loading: --speakers has a speaker model; the language exists."""
    if args.speakers is not None and not args.speaker_model:
        raise InvalidOptionError("--speakers needs --speaker-model (the CAM++ model "
                                 "iic/speech_campplus_sv_zh-cn_16k-common: a local folder or a Hugging Face id)")
    variants = [args.variant] if args.variant else ["nano", "mlt"]
    errors = []
    for variant in variants:
        try:
            langs.resolve(args.language, variant)
            break
        except ASRError as exc:
            errors.append(exc)
    else:
        raise errors[0]


def _batch(args: argparse.Namespace) -> int:
    """`funasr-nano batch`: exit status 0 when every input is done, 1 when some failed (see failures.jsonl),
    2 when nothing could start (bad options, no inputs, the model)."""
    from .batch import FAILURES_FILE, BatchOptions, discover, run_batch

    try:
        items = discover(args.inputs, args.manifest)
        if not items:
            raise InvalidOptionError("no audio or video files found in the inputs; pass files, folders or --manifest")
        options = BatchOptions(formats=tuple(dict.fromkeys(args.format)), language=args.language,
                               hotwords=tuple(_hotwords(args.hotwords)), itn=not args.no_itn,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, workers=args.workers,
                               progress=not args.no_progress and sys.stderr.isatty(), speakers=args.speakers)
        if args.ray is not None:
            _load_checks(args)
        else:
            model = _load(args)
    except ASRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.ray is not None:
            from .batch_ray import run_batch_ray

            summary = run_batch_ray(items, args.output_dir, options, model_kwargs=_model_kwargs(args),
                                    address=args.ray or None, replicas=args.replicas,
                                    gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica)
        else:
            summary = run_batch(model, items, args.output_dir, options)
    except KeyboardInterrupt:
        print("interrupted: what finished is recorded; run the same command again to go on", file=sys.stderr)
        return 130
    print(summary.line(), file=sys.stderr)
    if summary.failed:
        print(f"{summary.failed} failure(s) recorded in {Path(args.output_dir) / FAILURES_FILE}", file=sys.stderr)
    return 1 if summary.failed else 0


def _speakers(value: str) -> int | str:
    try:
        return parse_speakers(value)
    except InvalidOptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hotwords(values: list[str]) -> list[str]:
    return [w.strip() for v in values for w in v.split(",") if w.strip()]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader went away (`funasr-nano languages | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "languages":
        for lang in langs.languages(args.variant):
            note = f"  ({lang.note})" if lang.note else ""
            print(f"{lang.code:5} {lang.name:24} {lang.prompt_name}{note}")
        return 0
    if args.command == "batch":
        return _batch(args)
    several = len(args.files) > 1 and not args.output_dir
    if several and args.format in ("srt", "vtt"):
        print(f"error: {args.format} output of several files needs -o DIR (one file each)", file=sys.stderr)
        return 2
    try:
        model = _load(args)
    except ASRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status, results = 0, []
    for f in args.files:
        try:
            result = model.transcribe(f, language=args.language, hotwords=_hotwords(args.hotwords),
                                      itn=not args.no_itn, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, speakers=args.speakers)
        except ASRError as exc:
            print(f"error: {f}: {exc}", file=sys.stderr)
            status = 1
            continue
        for warning in result.warnings:
            print(f"warning: {f}: {warning}", file=sys.stderr)
        if args.output_dir:
            dest = Path(args.output_dir) / (Path(f).stem + "." + args.format)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(dest.suffix + ".part")
            tmp.write_text(render(result, args.format), encoding="utf-8")
            tmp.replace(dest)
        elif several and args.format == "json":
            results.append({"file": f, **json.loads(render(result, "json"))})
        else:
            if several:
                sys.stdout.write(f"{f}: ")
            sys.stdout.write(render(result, args.format))
        if args.verbose:
            t = result.timings
            logging.info("%s: %.2f s audio in %.2f s (RTF %.3f, %d tokens, %.1f tok/s)", f, t.audio_duration_s,
                         t.total_s, t.real_time_factor, t.generated_tokens, t.decode_tokens_per_s)
    if several and args.format == "json":  # one JSON document: an array, each result with its file
        sys.stdout.write(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
