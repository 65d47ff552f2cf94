"""``app.py serve``: the WebSocket broadcaster, the studio, the Gradio page and its routes, wired and started."""
from __future__ import annotations

import argparse
import logging
import sys

from core.image import load_image
from live.broadcaster import Broadcaster
from live.engines import choose_engine, load_engine
from live.studio import Studio

from .page import EXAMPLE_IMAGE, PAGE_CSS, ROOT, build_ui
from .routes import add_routes

log = logging.getLogger(__name__)


def serve(args: argparse.Namespace) -> int:
    import gradio as gr
    from gradio.utils import MatplotlibBackendMananger

    try:
        broadcaster = Broadcaster(args.host, args.ws_port, hello_info={"app_port": args.port}).start()
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    studio = Studio(broadcaster, outputs_dir=args.outputs, checkpoint_dir=args.checkpoints, device=args.device,
                    max_audio_s=args.max_audio_seconds)
    choice = choose_engine("auto", args.checkpoints)
    print(f"Engine: {choice.reason}", flush=True)
    load_engine(choice.name, args.checkpoints, args.device)  # models load once, before the first click
    _warm_idle_animation(studio)
    with MatplotlibBackendMananger():  # gradio imports matplotlib around every event; pay for it now, not on a click
        pass

    demo = build_ui(studio, max_jobs=args.max_jobs)
    app, local_url, share_url = demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True, quiet=True,
        allowed_paths=[studio.outputs_dir, str(ROOT / "examples")], theme=gr.themes.Soft(), css=PAGE_CSS,
        footer_links=["api", "settings"])
    add_routes(app, studio.outputs_dir, ws_port=broadcaster.port, app_port=args.port)
    print(f"SadTalker Live is running at {local_url}", flush=True)
    print(f"Live viewer: {local_url.rstrip('/')}/viewer  (WebSocket {broadcaster.url})", flush=True)
    if share_url:
        print(f"Public link: {share_url}  (the live viewer stays local: its WebSocket port is not shared)", flush=True)
    try:
        demo.block_thread()
    finally:
        broadcaster.stop()
    return 0


def _warm_idle_animation(studio: Studio) -> None:
    """First-click latency: run the idle animator once so its detector and code paths are warm."""
    if not EXAMPLE_IMAGE.is_file():
        return
    try:
        studio.idle_animator(load_image(str(EXAMPLE_IMAGE))).render(0.0)
    except Exception:  # warming is an optimisation only
        log.warning("could not warm up the idle animation", exc_info=True)
