"""SadTalker Live: a portrait and a speech clip in, a talking-head video out, live while it renders.

    python app.py [serve] [--host 127.0.0.1] [--port 7860] [--ws-port 8765] [--auth USER:PASSWORD] ...
    python app.py render --image I --audio A --output O.mp4 [--engine auto|lite|sadtalker] [options]
    python app.py weights verify|download [--checkpoints checkpoints]

Thin on purpose: the command line and the wiring. The page is ``web/``, the live machinery ``live/``, the engines
``preview/`` (Lite) and ``sadtalker/``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from core.audio import MIN_AUDIO_S
from core.errors import SadTalkerError
from core.options import cli_flag, is_angle_path_option, is_path_option, options_from_user, user_options
from live.broadcaster import DEFAULT_MAX_VIEWERS
from live.engines import DTYPE_CHOICES, ENGINE_CHOICES, set_dtype
from live.job_folders import DEFAULT_KEEP_HOURS, DEFAULT_KEEP_JOBS
from live.session import single_threaded_opencv
from sadtalker.checkpoints import DEFAULT_CHECKPOINT_DIR

EXIT_USAGE = 2  # bad input or installation: a one-line message says what to do
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------------------------- flags
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="SadTalker Live: talking-head videos, live.")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="start the web app (the default)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to bind; beyond this computer (0.0.0.0 = every interface) needs --auth")
    serve.add_argument("--port", type=int, default=7860, help="port of the web app")
    serve.add_argument("--ws-port", type=int, default=8765, help="port of the live viewer's WebSocket server")
    serve.add_argument("--share", action="store_true",
                       help="also publish a temporary public gradio.live link (needs --auth)")
    serve.add_argument("--auth", default=os.environ.get("SADTALKER_LIVE_AUTH"), metavar="USER:PASSWORD",
                       help="log in to the page, its API, the viewer, the videos and the live stream "
                            "(default: $SADTALKER_LIVE_AUTH; required with --share or beyond this computer)")
    serve.add_argument("--outputs", default="outputs", help="where finished videos are kept")
    serve.add_argument("--keep-outputs", type=int, default=DEFAULT_KEEP_JOBS, metavar="JOBS",
                       help="finished videos kept, the newest first (0 = no limit)")
    serve.add_argument("--keep-hours", type=float, default=DEFAULT_KEEP_HOURS, metavar="HOURS",
                       help="finished videos older than this are removed (0 = no limit)")
    serve.add_argument("--max-viewers", type=int, default=DEFAULT_MAX_VIEWERS,
                       help="live viewer connections at once (further ones are refused with a message)")
    serve.add_argument("--max-jobs", type=int, default=1, help="generations running at once (others queue)")
    serve.add_argument("--rtmp-url", default=None, metavar="URL",
                       help="push the page's live stream to this RTMP server (rtmp://host/app/key), one continuous "
                            "stream across jobs")
    serve.add_argument("--max-sessions", type=int, default=8, help="live avatar sessions at once")
    serve.add_argument("--session-idle-minutes", type=float, default=30.0,
                       help="a live session with no speech and no viewer for this long ends by itself")
    serve.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                       help="another web origin whose pages may watch the live streams (repeatable), "
                            "e.g. https://my.site; 'null' for the viewer opened as a file")
    _add_worker_flags(serve, required=False)
    _add_engine_flags(serve)

    render = commands.add_parser("render", help="render one video without the web app")
    render.add_argument("--image", required=True, help="portrait photo (any format Pillow reads)")
    render.add_argument("--audio", required=True, help="speech recording (wav, mp3, m4a, ogg, flac, ...)")
    render.add_argument("--output", required=True, help="mp4 file to write")
    render.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                        help="auto = SadTalker when its weights are in --checkpoints, else lite")
    _add_engine_flags(render)
    _add_option_flags(render)

    worker = commands.add_parser("worker", help="speak messages from a RabbitMQ queue into live sessions")
    _add_worker_flags(worker, required=True)
    worker.add_argument("--outputs", default="outputs", help="where session recordings and worker state are kept")
    worker.add_argument("--max-sessions", type=int, default=8, help="live sessions this worker holds at once")
    _add_engine_flags(worker)

    weights = commands.add_parser("weights", help="check or download the official SadTalker weights")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    verify = weights_commands.add_parser("verify", help="check size and SHA-256 of the files in --checkpoints")
    download = weights_commands.add_parser("download", help="download the official files (resumable, verified)")
    for sub in (verify, download):
        sub.add_argument("--checkpoints", default=DEFAULT_CHECKPOINT_DIR, help="checkpoint folder")
        sub.add_argument("--verbose", action="store_true", help="debug logging")
    download.add_argument("--base-url", default=None, help="fetch <BASE_URL>/<file name> instead of the release URLs")
    download.add_argument("--files", nargs="+", default=None, metavar="NAME", help="only these files")
    download.add_argument("--retries", type=int, default=3, help="automatic resumes per file")
    download.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")

    if not argv or argv[0] not in ("serve", "render", "worker", "weights", "-h", "--help"):
        argv = ["serve", *argv]
    return parser.parse_args(argv)


def _add_worker_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    import socket

    group = parser.add_argument_group("message queue (RabbitMQ)")
    group.add_argument("--amqp", required=required, metavar="URL", help="broker, e.g. amqp://guest:guest@127.0.0.1/")
    group.add_argument("--queue", default="sadtalker", help="the name publishers send to (exchange and queue prefix)")
    group.add_argument("--worker-name", default=socket.gethostname(),
                       help="this worker's name, stable across restarts and unique among the workers")
    group.add_argument("--media-root", default=None, metavar="DIR",
                       help="images and audio files of messages are read only from under this folder")


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", default=DEFAULT_CHECKPOINT_DIR, help="folder with the official weights")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="SadTalker renderer precision: auto (float16 on a GPU, float32 on a CPU), float32 "
                             "(faithful), bfloat16 (CPUs with bf16 instructions, ~1.5x faster) or float16 (GPU)")
    parser.add_argument("--max-audio-seconds", type=float, default=300.0, help="longer audio is refused")
    parser.add_argument("--min-audio-seconds", type=float, default=MIN_AUDIO_S, help="shorter audio is refused")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per user option of ``core.options`` (the page builds its controls from the same list)."""
    group = parser.add_argument_group("generation options (SadTalker engine; the Lite engine uses blink and seed)")
    for name, default, control in user_options():
        flag, text = cli_flag(name, control), f"{control.label.lower()}: {control.help}"
        if isinstance(default, bool):
            group.add_argument(flag, dest=name, default=default, help=text, action=argparse.BooleanOptionalAction)
        elif is_angle_path_option(name):
            group.add_argument(flag, dest=name, type=float, nargs="+", metavar="DEG", help=text)
        elif is_path_option(name):
            group.add_argument(flag, dest=name, metavar="VIDEO", help=text)
        else:
            kind = type(default) if default is not None else type(control.choices[0]) if control.choices else int
            group.add_argument(flag, dest=name, default=default, type=kind, choices=control.choices, help=text)


# ------------------------------------------------------------------------------------------------------- commands
def render(args: argparse.Namespace) -> int:
    from live.console import render_file

    values = {name: getattr(args, name) for name, _, _ in user_options()}
    options = options_from_user(values, output=os.path.abspath(args.output), max_audio_s=args.max_audio_seconds,
                                min_audio_s=args.min_audio_seconds)
    render_file(args.image, args.audio, options, args.engine, args.checkpoints, args.device)
    return 0


def weights(args: argparse.Namespace) -> int:
    from sadtalker.weights import download, verify_report

    if args.weights_command == "verify":
        return 0 if verify_report(args.checkpoints, out=sys.stdout) else 1
    download(args.checkpoints, args.files, args.base_url, retries=args.retries, timeout=args.timeout, out=sys.stderr)
    return 0


def worker(args: argparse.Namespace) -> int:
    from live.worker import run_worker

    return run_worker(args)


def serve(args: argparse.Namespace) -> int:
    from web.server import serve as run_server

    return run_server(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "websockets.server"):  # one line per HTTP request / connection otherwise
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    command = {"render": render, "weights": weights, "worker": worker}.get(args.command, serve)
    if hasattr(args, "dtype"):
        set_dtype(args.dtype)
    single_threaded_opencv()
    try:
        return command(args)
    except SadTalkerError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = "; run the same command again to resume the download" if args.command == "weights" else ""
        print(f"\nstopped{hint}.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into a command that stopped reading (e.g. `| head`)
        sys.stderr.close()
        return 1


if __name__ == "__main__":
    sys.exit(main())
