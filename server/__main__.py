"""`funasr-nano-mcp`: run the speech-to-text MCP server over stdio.

stdout carries the protocol and nothing else: until the SDK takes over the standard streams, both
the Python `sys.stdout` and file descriptor 1 point at stderr, so nothing printed while the heavy
modules import can corrupt the wire. Logs always go to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio

from .wire import StdinPump


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    sys.stdout.flush()
    saved_fd = os.dup(1)
    saved_obj = sys.stdout
    try:
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        yield
    finally:
        sys.stdout = saved_obj
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The SDK logs whole messages at DEBUG, and those would include transcripts: keep it at INFO or above.
    logging.getLogger("mcp").setLevel(max(logging.INFO, logging.getLevelName(level)))
    for noisy in ("httpcore2", "httpx2", "anyio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None, *, model_loader: Callable[[], Any] | None = None) -> None:
    """Parse flags/environment and serve over stdio until stdin closes or SIGINT/SIGTERM arrives.

    `model_loader` replaces `asr.load_model` (for tests and embedding); it runs on the worker thread.
    Once the server has started, the process ends through `os._exit` (see `_end`).
    """
    from . import __version__
    from .config import ConfigError, build_parser, load_settings

    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        sys.stderr.write(f"funasr-nano-mcp {__version__}\n")
        return
    if "-h" in args or "--help" in args:
        build_parser().print_help(sys.stderr)
        return
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        sys.stderr.write(f"funasr-nano-mcp: configuration error: {exc}\n")
        raise SystemExit(2) from None
    _setup_logging(settings.log_level)
    log = logging.getLogger("server")
    code = 0
    # until the event loop takes them over (_serve), SIGINT and SIGTERM interrupt the start-up alike
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with _stdout_to_stderr():
            from .app import create_server

            server = create_server(settings, model_loader=model_loader, divert_stdout=True)
            _setup_logging(settings.log_level)  # MCPServer() may have installed its own handler
        log.info("funasr-nano-mcp %s: model=%s dtype=%s quantize=%s roots=%s url_policy=%s", __version__,
                 settings.model or "(default)", settings.dtype, settings.quantize,
                 os.pathsep.join(str(r) for r in settings.allowed_roots), settings.url_policy)
        anyio.run(_serve, server)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # noqa: BLE001 - reported, then the process ends with status 1
        if _client_gone(exc):
            log.info("the client closed the connection; stopping")  # jobs were cancelled by the lifespan's exit
        else:
            log.exception("funasr-nano-mcp failed")
            code = 1
    log.info("funasr-nano-mcp stopped")
    _end(code)


async def _serve(server: Any) -> None:
    """Serve over stdio until the client closes stdin. SIGINT and SIGTERM end the input the same way, so a signal
    takes the one shutdown path: the SDK cancels the calls in flight (running and queued jobs are cancelled,
    downloads delete their temporary folders) and the lifespan stops the model thread."""
    pump = StdinPump()
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    logging.getLogger("server").info("%s received; stopping", signal.Signals(signum).name)
                    pump.stop()

        tg.start_soon(on_signal)
        await server.run_stdio_async()
        tg.cancel_scope.cancel()


def _end(code: int) -> None:
    """Flush what was written and end the process at once, skipping the interpreter's and the libraries' exit
    handlers: with the model thread still inside MLX (loading, decoding), running C++ static destructors aborted
    the process ("terminate called without an active exception", SIGABRT). Jobs were cancelled, temporary files
    deleted and the model thread told to stop before this."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _client_gone(exc: BaseException) -> bool:
    """A broken pipe or reset on stdout (possibly inside task-group exception groups): the client is gone."""
    inner = getattr(exc, "exceptions", None)  # (Base)ExceptionGroup, also the Python 3.10 backport
    if inner:
        return all(_client_gone(e) for e in inner)
    return isinstance(exc, (BrokenPipeError, ConnectionResetError))


if __name__ == "__main__":
    main()
