"""SadTalker Live: a portrait and a speech clip in, a talking-head video out, live while it renders.

    python app.py [serve] [--host 127.0.0.1] [--port 7860] [--ws-port 8765] [--checkpoints checkpoints] ...
    python app.py render --image I --audio A --output O.mp4 [--engine auto|lite|sadtalker] [options]

Thin on purpose: flags and the Gradio page live here; the work is done in ``preview/`` and ``sadtalker/``.
"""

import argparse
import html
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"
VIEWER_HTML = ROOT / "streaming_client.html"
# The page's live image shows every other display frame: each Gradio update costs ~10 ms of server CPU (encode,
# cache file, diff, SSE, the browser's fetch), which at 25 per second would slow generation; the viewer shows all 25.
PAGE_FPS = 12.5

log = logging.getLogger("sadtalker_live")


# ------------------------------------------------------------------------------------------------------- flags
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="SadTalker Live: talking-head videos, live.")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="start the web app (the default)")
    _add_serve_flags(serve)

    render = commands.add_parser("render", help="render one video without the web app")
    render.add_argument("--image", required=True, help="portrait photo (any format Pillow reads)")
    render.add_argument("--audio", required=True, help="speech recording (wav, mp3, m4a, ogg, flac, ...)")
    render.add_argument("--output", required=True, help="mp4 file to write")
    render.add_argument("--engine", default="auto", choices=("auto", "lite", "sadtalker"),
                        help="auto = SadTalker when its weights are in --checkpoints, else lite")
    _add_common_flags(render)
    _add_option_flags(render)

    if not argv or argv[0] not in ("serve", "render", "-h", "--help"):
        argv = ["serve", *argv]
    return parser.parse_args(argv)


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", default=str(ROOT / "checkpoints"), help="folder with the official weights")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-audio-seconds", type=float, default=300.0, help="longer audio is refused")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port of the web app")
    parser.add_argument("--ws-port", type=int, default=8765, help="port of the live viewer's WebSocket server")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--outputs", default=str(ROOT / "outputs"), help="where finished videos are kept")
    parser.add_argument("--max-jobs", type=int, default=1, help="generations running at once (others queue)")
    _add_common_flags(parser)


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    from core.options import ENHANCER_CHOICES, PREPROCESS_CHOICES

    group = parser.add_argument_group("generation options (SadTalker engine; the lite engine uses blink and seed)")
    group.add_argument("--preprocess", default="crop", choices=PREPROCESS_CHOICES)
    group.add_argument("--still", action="store_true", help="keep the source head pose")
    group.add_argument("--pose-style", type=int, default=0, help="0..45")
    group.add_argument("--expression-scale", type=float, default=1.0)
    group.add_argument("--enhancer", default=None, choices=ENHANCER_CHOICES)
    group.add_argument("--size", type=int, default=256, choices=(256, 512))
    group.add_argument("--batch-size", type=int, default=2)
    group.add_argument("--no-blink", action="store_true", help="no eye blinks")
    group.add_argument("--seed", type=int, default=None, help="fixed randomness (head motion, blinks)")


# ------------------------------------------------------------------------------------------------------- render
def render(args: argparse.Namespace) -> int:
    from live.engines import choose_engine, load_engine
    from live.job import run_headless
    from core.errors import SadTalkerError
    from core.options import Options

    try:
        options = Options(output=os.path.abspath(args.output), seed=args.seed, max_audio_s=args.max_audio_seconds,
                          use_blink=not args.no_blink, preprocess=args.preprocess, still=args.still,
                          pose_style=args.pose_style, expression_scale=args.expression_scale, size=args.size,
                          batch_size=args.batch_size, enhancer=args.enhancer).check()
        choice = choose_engine(args.engine, args.checkpoints)
        print(f"Engine: {choice.reason}", file=sys.stderr)
        engine = load_engine(choice.name, args.checkpoints, args.device)
        run_headless(engine, args.image, args.audio, options)
    except SadTalkerError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped.", file=sys.stderr)
        return 130
    return 0


# ------------------------------------------------------------------------------------------------------- serve
def serve(args: argparse.Namespace) -> int:
    import gradio as gr
    from gradio.utils import MatplotlibBackendMananger

    from live.broadcaster import Broadcaster
    from live.engines import choose_engine, load_engine
    from live.job import Studio

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
    _warm_idle_animation()
    with MatplotlibBackendMananger():  # gradio imports matplotlib around every event; pay for it now, not on a click
        pass

    demo = build_ui(studio, max_jobs=args.max_jobs)
    app, local_url, share_url = demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True, quiet=True,
        allowed_paths=[studio.outputs_dir, str(ROOT / "examples")], theme=gr.themes.Soft(), css=PAGE_CSS,
        footer_links=["api", "settings"])
    add_routes(app, studio, ws_port=broadcaster.port, app_port=args.port)
    print(f"SadTalker Live is running at {local_url}", flush=True)
    print(f"Live viewer: {local_url.rstrip('/')}/viewer  (WebSocket {broadcaster.url})", flush=True)
    if share_url:
        print(f"Public link: {share_url}  (the live viewer stays local: its WebSocket port is not shared)", flush=True)
    try:
        demo.block_thread()
    finally:
        broadcaster.stop()
    return 0


def add_routes(app, studio, ws_port: int, app_port: int) -> None:
    """The viewer page and the finished videos, served by the same HTTP server as the Gradio page."""
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    page = VIEWER_HTML.read_text(encoding="utf-8").replace(
        'data-ws-port="" data-app-port=""', f'data-ws-port="{ws_port}" data-app-port="{app_port}"', 1)

    @app.get("/viewer", response_class=HTMLResponse, include_in_schema=False)
    def viewer() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    os.makedirs(studio.outputs_dir, exist_ok=True)
    app.mount("/outputs", StaticFiles(directory=studio.outputs_dir), name="outputs")


def _warm_idle_animation() -> None:
    """First-click latency: run the idle animator once so its detector and code paths are warm."""
    if not EXAMPLE_IMAGE.is_file():
        return
    try:
        from preview.idle import IdleAnimator
        from core.image import load_image

        IdleAnimator(load_image(str(EXAMPLE_IMAGE)), size=128).render(0.0)
    except Exception:  # warming is an optimisation only
        log.warning("could not warm up the idle animation", exc_info=True)


# ------------------------------------------------------------------------------------------------------- the page
PAGE_CSS = """
#engine-line { font-size: 0.95em; }
#live img { width: 100%; height: 100%; object-fit: contain; }
.stl-progress { height: 12px; border-radius: 6px; background: var(--block-background-fill);
                border: 1px solid var(--border-color-primary); overflow: hidden; }
.stl-progress > div { height: 100%; background: var(--color-accent); transition: width .15s; }
.stl-progress-text { margin-top: 4px; font-variant-numeric: tabular-nums; }
.stl-error { color: var(--error-text-color); }
"""


def build_ui(studio, max_jobs: int = 1):
    import gradio as gr

    from live.engines import ENGINE_CHOICES, choose_engine
    from core.errors import SadTalkerError
    from core.options import ENHANCER_CHOICES, NUM_POSE_STYLES, PREPROCESS_CHOICES, Options

    defaults = Options()
    jobs_by_session: dict[str, str] = {}

    def describe(engine: str):
        try:
            choice = choose_engine(engine, studio.checkpoint_dir)
        except SadTalkerError as exc:
            line, usable = f"**Engine:** ⚠️ {exc}", False
        else:
            line, usable = f"**Engine:** {choice.reason}", choice.honours_sadtalker_options
        note = ("" if usable else "Greyed out: the Lite engine does not use these options. "
                "Add the official SadTalker weights (see README) to enable them.")
        return [line, gr.update(value=note, visible=bool(note))] + [gr.update(interactive=usable)] * 7

    def generate(image: str, audio: str, engine: str = "auto", preprocess: str = defaults.preprocess,
                 still: bool = defaults.still, pose_style: int = defaults.pose_style,
                 expression_scale: float = defaults.expression_scale, enhancer: str = "none",
                 size: int = defaults.size, batch_size: int = defaults.batch_size, blink: bool = defaults.use_blink,
                 request: gr.Request = None):
        """Generate a talking-head video; yields live frames and progress; the last output is the mp4."""
        image, audio = _uploaded_path(image), _uploaded_path(audio)
        try:
            options = Options(preprocess=preprocess, still=bool(still), pose_style=int(pose_style),
                              expression_scale=float(expression_scale),
                              enhancer=None if enhancer in (None, "", "none") else enhancer, size=int(size),
                              batch_size=int(batch_size), use_blink=bool(blink))
            job = studio.start(image, audio, options, engine)
        except SadTalkerError as exc:
            raise gr.Error(str(exc), title="Cannot start") from None
        session = getattr(request, "session_hash", None)
        if session:
            jobs_by_session[session] = job.id
        shown_seq = 0
        try:
            for snap in job.updates(max_fps=PAGE_FPS):
                frame = gr.skip()
                if snap.frame is not None and snap.frame.seq != shown_seq:
                    frame, shown_seq = snap.frame.rgb, snap.frame.seq
                if snap.state == "running":
                    yield frame, progress_html(snap), gr.skip(), gr.skip()
            if snap.state == "error":
                raise gr.Error(snap.error or "Generation failed.", title="Generation failed")
            last_frame = snap.frame.rgb if snap.frame is not None else None
            if snap.state == "cancelled":
                yield last_frame, progress_html(snap), None, "Stopped — nothing was saved."
                return
            yield last_frame, progress_html(snap), snap.video_path, result_text(snap)
        finally:
            if not job.finished:  # the page went away or Stop cancelled this event: stop the work too
                job.cancel()  # (the entry stays, so a Stop handled after this cancellation still finds the job)
            elif session and jobs_by_session.get(session) == job.id:
                del jobs_by_session[session]

    def image_uploaded(image):
        try:
            studio.prepare(_uploaded_path(image))
        except SadTalkerError as exc:
            gr.Warning(str(exc))

    def stop(request: gr.Request = None):
        """Cancel this page's job and say so on the progress line (the cancelled event yields nothing more)."""
        job_id = jobs_by_session.get(getattr(request, "session_hash", None) or "")
        if not job_id:
            return gr.skip(), gr.skip()
        studio.cancel(job_id)
        return STOPPED_HTML, ""

    with gr.Blocks(title="SadTalker Live", delete_cache=(900, 3600)) as demo:
        gr.Markdown("# SadTalker Live\nA portrait and a speech clip in, a talking-head video out — "
                    "watch it come alive while it renders.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Portrait", sources=["upload", "clipboard"], height=300)
                audio = gr.Audio(type="filepath", sources=["upload", "microphone"], label="Speech")
                engine_line = gr.Markdown(elem_id="engine-line")
                engine = gr.Radio(list(ENGINE_CHOICES), value="auto", label="Engine",
                                  info="auto = SadTalker when its weights are installed, else Lite")
                with gr.Accordion("SadTalker options", open=False):
                    options_note = gr.Markdown()
                    preprocess = gr.Dropdown(list(PREPROCESS_CHOICES), value=defaults.preprocess, label="Preprocess",
                                             info="crop the face, or animate the full image (full / extfull)")
                    still = gr.Checkbox(value=defaults.still, label="Still mode (keep the photo's head pose)")
                    pose_style = gr.Slider(0, NUM_POSE_STYLES - 1, value=defaults.pose_style, step=1,
                                           label="Pose style")
                    expression_scale = gr.Slider(0.0, 3.0, value=defaults.expression_scale, step=0.1,
                                                 label="Expression scale")
                    enhancer = gr.Dropdown(["none", *ENHANCER_CHOICES], value="none", label="Face enhancer")
                    size = gr.Radio([256, 512], value=defaults.size, label="Face render size")
                    batch_size = gr.Slider(1, 10, value=defaults.batch_size, step=1, label="Batch size")
                blink = gr.Checkbox(value=defaults.use_blink, label="Eye blinks")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary")
                    stop_button = gr.Button("Stop", variant="stop")
            with gr.Column(scale=1):
                live = gr.Image(label="Live", type="numpy", format="jpeg", interactive=False, height=360,
                                buttons=["fullscreen"], elem_id="live")
                progress = gr.HTML(progress_html(None))
                gr.HTML('<a href="/viewer" target="_blank" rel="noopener">Open live viewer ↗</a> '
                        '— the same live frames in a separate tab (open as many as you like).')
                video = gr.Video(label="Result", interactive=False, height=360)
                result = gr.Markdown()
        if EXAMPLE_IMAGE.is_file() and EXAMPLE_AUDIO.is_file():
            gr.Examples([[str(EXAMPLE_IMAGE), str(EXAMPLE_AUDIO)]], inputs=[image, audio],
                        label="Example (click to load, then Generate)")

        option_inputs = [preprocess, still, pose_style, expression_scale, enhancer, size, batch_size]
        describe_outputs = [engine_line, options_note, *option_inputs]
        demo.load(describe, inputs=[engine], outputs=describe_outputs, api_visibility="private", queue=False)
        engine.change(describe, inputs=[engine], outputs=describe_outputs, api_visibility="private", queue=False)
        run = generate_button.click(generate, inputs=[image, audio, engine, *option_inputs, blink],
                                    outputs=[live, progress, video, result], api_name="generate",
                                    # a click waiting for its turn shows its queue position on the progress line
                                    show_progress="full", show_progress_on=[progress], concurrency_limit=max_jobs,
                                    # Our own loaders read the uploads: Gradio's image preprocessing would fail on a
                                    # non-image with a generic error instead of our message saying what to do.
                                    preprocess=False)
        stop_button.click(stop, outputs=[progress, result], api_visibility="private", cancels=[run], queue=False)
        # queued (not queue=False): a warning can only reach the page through the queue's event stream
        image.upload(image_uploaded, inputs=[image], api_visibility="private", preprocess=False,
                     show_progress="hidden", concurrency_limit=4)
    return demo


def _uploaded_path(value) -> str | None:
    """The file path of an upload: Gradio hands over its file record (``preprocess=False``), a script a path."""
    if isinstance(value, dict):
        return value.get("path")
    return value or None


def progress_html(snap) -> str:
    if snap is None:
        return ('<div class="stl-progress"><div style="width:0%"></div></div>'
                '<div class="stl-progress-text">Ready — upload a portrait and a speech clip, then Generate.</div>')
    if snap.state == "error":
        return (f'<div class="stl-progress"><div style="width:0%"></div></div>'
                f'<div class="stl-progress-text stl-error">{html.escape(snap.error or "Generation failed.")}</div>')
    fraction = 1.0 if snap.state == "done" else (snap.done / snap.total if snap.total else 0.0)
    parts = [html.escape(snap.message or snap.stage)]
    if snap.total and snap.state == "running":
        parts.append(f"{snap.done}/{snap.total} frames")
        if snap.done < snap.total:
            parts.append(f"ETA {snap.eta_s:.1f} s" if snap.eta_s is not None else "ETA estimating…")
    parts.append(f"{snap.elapsed_s:.1f} s elapsed")
    return (f'<div class="stl-progress"><div style="width:{fraction * 100:.1f}%"></div></div>'
            f'<div class="stl-progress-text">{" · ".join(parts)}</div>')


STOPPED_HTML = ('<div class="stl-progress"><div style="width:0%"></div></div>'
                '<div class="stl-progress-text">Stopped — nothing was saved. Generate to start again.</div>')


def result_text(snap) -> str:
    return (f"**Done** — {snap.duration_s:.1f} s video made by the **{snap.engine}** engine "
            f"in {snap.elapsed_s:.1f} s. [Download the mp4]({snap.video_url})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "websockets.server"):  # one line per HTTP request / connection otherwise
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    sys.path.insert(0, str(ROOT))
    return render(args) if args.command == "render" else serve(args)


if __name__ == "__main__":
    sys.exit(main())
