"""``app.py serve``: the WebSocket broadcaster, the studio, the Gradio page and its routes, wired and started."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from core.engine import MotionReady
from core.errors import InputError
from core.image import load_image
from core.landmarks import shared_detector
from core.options import Options
from live.broadcaster import Broadcaster
from live.engines import choose_engine, load_engine
from live.job_folders import JobFolders
from live.outputs import PageRtmpOutput
from live.session import SessionManager, check_rtmp_url
from live.stream import StreamHub
from live.studio import Studio
from live.worker import QueueWorker, worker_config

from .access import Access, empty_dir, raise_file_limit, upload_cache_dir, url_host, viewer_cap
from .page import EXAMPLE_AUDIO, EXAMPLE_IMAGE, PAGE_CSS, ROOT, build_ui
from .routes import add_routes
from .sessions import add_session_routes
from .transports import add_transport_routes

log = logging.getLogger(__name__)


def serve(args: argparse.Namespace) -> int:
    access = Access.from_flags(args.host, args.auth, args.share, args.ws_port)  # refuses what would be unsafe
    folders = JobFolders(args.outputs, args.keep_outputs, args.keep_hours).claim()  # one app per outputs folder
    folders.remove_incomplete()  # what a kill or a crash left mid-render: never served
    folders.prune()
    uploads = upload_cache_dir(folders.path)
    empty_dir(uploads)  # what a killed run of this app left in Gradio's cache
    os.environ["GRADIO_TEMP_DIR"] = uploads  # read as gradio is imported and the page is built
    import gradio as gr
    from gradio.utils import MatplotlibBackendMananger

    max_viewers = viewer_cap(args.max_viewers, raise_file_limit())
    if max_viewers < args.max_viewers:
        print(f"Live viewers: at most {max_viewers} (the open-file limit leaves no more; raise it with ulimit -n)",
              flush=True)
    try:
        broadcaster = Broadcaster(args.host, args.ws_port, hello_info={"app_port": args.port}, app_port=args.port,
                                  allowed_origins=set(getattr(args, "allowed_origin", None) or ()),
                                  token=access.token, max_viewers=max_viewers).start()
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hub = StreamHub(broadcaster)
    studio = Studio(broadcaster, outputs_dir=args.outputs, checkpoint_dir=args.checkpoints, device=args.device,
                    max_audio_s=args.max_audio_seconds, folders=folders, min_audio_s=args.min_audio_seconds, hub=hub)
    page_rtmp = None
    if args.rtmp_url:
        check_rtmp_url(args.rtmp_url)
        page_rtmp = PageRtmpOutput(hub, args.rtmp_url)
    choice = choose_engine("auto", args.checkpoints)
    print(f"Engine: {choice.reason}", flush=True)
    engine = load_engine(choice.name, args.checkpoints, args.device)  # models load once, before the first click
    _warm_up(studio, engine)
    with MatplotlibBackendMananger():  # gradio imports matplotlib around every event; pay for it now, not on a click
        pass

    sessions = SessionManager(broadcaster, os.path.join(studio.outputs_dir, "sessions"),
                              lambda: shared_detector(args.checkpoints), max_sessions=args.max_sessions,
                              idle_minutes=args.session_idle_minutes, hub=hub, checkpoint_dir=args.checkpoints,
                              device=args.device)
    broadcaster.speech_handler = lambda session_id, samples, final: _speak(sessions, session_id, samples, final)
    demo = build_ui(studio, sessions, max_jobs=args.max_jobs, viewer_token=access.token)
    app, local_url, share_url = demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True, quiet=True,
        auth=access.credentials, allowed_paths=[studio.outputs_dir, str(ROOT / "examples")],
        theme=gr.themes.Soft(), css=PAGE_CSS, footer_links=["api", "settings"])
    add_routes(app, studio.outputs_dir, ws_port=broadcaster.port, app_port=args.port, access=access)
    add_session_routes(app, sessions, broadcaster, ws_port=broadcaster.port, access=access)
    add_transport_routes(app, hub, broadcaster, sessions, os.path.join(studio.outputs_dir, "hls"), access=access)
    queue_worker = None
    if args.amqp:
        queue_worker = QueueWorker(worker_config(args), sessions).start()
        print(f"Consuming RabbitMQ queue {queue_worker.queue_name} into live sessions", flush=True)
    bound = f"http://{url_host(args.host)}:{args.port}/"  # where it listens, as bound (0.0.0.0: every interface)
    print(f"SadTalker Live is running at {bound}" + (f"  (on this computer: {local_url})" if bound != local_url
                                                    else ""), flush=True)
    print(f"Live viewer: {bound}viewer  (WebSocket {url_host(args.host)}:{broadcaster.port}"
          + ("; it needs the login or the token the page hands out" if access.token else "") + ")", flush=True)
    for warning in access.exposure(args.port, broadcaster.port, bool(share_url)):
        print(warning, flush=True)
    if share_url:
        print(f"Public link: {share_url}  (the live viewer stays local: its WebSocket port is not shared)", flush=True)
    def shut_down(signum, frame):  # Ctrl-C, and SIGTERM (kill, docker stop, systemd) alike
        studio.cancel_all(wait_s=0)  # first: the jobs stop now, not after the web server's own shutdown
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, shut_down)
    signal.signal(signal.SIGTERM, shut_down)
    try:
        demo.block_thread()
    finally:
        ended = studio.cancel_all()  # engines closed: their ffmpeg ended, partial files removed
        if queue_worker is not None:
            queue_worker.stop()
        if page_rtmp is not None:
            page_rtmp.close()
        sessions.close()
        hub.close_all()
        broadcaster.stop()
        demo.close()
        empty_dir(uploads)
        folders.release()
        print("Stopped." if ended else "Stopped (a job did not end in time).", flush=True)
    return 0


def _warm_up(studio: Studio, engine) -> None:
    """First-click latency: run the idle animation once, and the Lite engine's path to its motion, so detectors,
    imports and code paths are warm when a user clicks (SadTalker's networks were loaded already)."""
    if not (EXAMPLE_IMAGE.is_file() and EXAMPLE_AUDIO.is_file()):
        return
    try:
        studio.idle_animator(load_image(str(EXAMPLE_IMAGE))).render(0.0)
        if engine.name == "lite":
            events = engine.generate(str(EXAMPLE_IMAGE), str(EXAMPLE_AUDIO), Options(seed=0))
            for event in events:
                if isinstance(event, MotionReady):
                    event.preview.render(0)
                    break
            events.close()
    except Exception:  # warming is an optimisation only
        log.warning("could not warm up", exc_info=True)


def _speak(sessions: SessionManager, session_id: str, samples, final: bool) -> None:
    """Speech from a viewer's microphone (over the WebSocket) for a live session."""
    session = sessions.get(session_id)
    if session is None:
        raise InputError(f"no live session {session_id!r}")
    session.speak(samples, final=final)
