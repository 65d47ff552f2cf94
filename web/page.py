"""The Gradio page: portrait + speech in, the live picture and progress while it renders, the mp4 at the end.

The option controls are built from ``core.options`` (the same source as the CLI flags), so adding an option there
adds it here. Errors a user can fix come back as ``gr.Error`` with the message of our own exception.
"""
from __future__ import annotations

import html
import inspect
from pathlib import Path
from urllib.parse import quote

from core.errors import SadTalkerError
from core.options import Control, is_angle_path_option, is_path_option, options_from_user, user_options
from live.engines import ENGINE_CHOICES, choose_engine

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"
# The live picture and its speech play in the embedded viewer (25 fps, straight from the WebSocket); the page
# itself only updates its progress line, at most this often.
PAGE_UPDATES_PER_S = 5.0

# The embedded player stays loaded from one Generate to the next (a new document at the click would compete with the
# first frames and speech for the CPU): the page tells it, from its own origin, which job to follow.
FOLLOW_JOB_JS = """(job) => {
  const frame = document.querySelector('#live iframe');
  if (frame && job) {
    frame.dataset.job = job;
    frame.contentWindow.postMessage({ type: 'follow', job }, location.origin);
  }
  return [];
}"""

PAGE_CSS = """
#engine-line { font-size: 0.95em; }
#live iframe, #live-session iframe { width: 100%; height: 430px; border: 0; border-radius: 8px;
                                     background: #0f1115; }
#live-session iframe { height: 560px; }
.stl-progress { height: 12px; border-radius: 6px; background: var(--block-background-fill);
                border: 1px solid var(--border-color-primary); overflow: hidden; }
.stl-progress > div { height: 100%; background: var(--color-accent); transition: width .15s; }
.stl-progress-text { margin-top: 4px; font-variant-numeric: tabular-nums; }
.stl-error { color: var(--error-text-color); }
"""


def option_control(name: str, default, control: Control):
    """The Gradio component of one option."""
    import gradio as gr

    info = control.help or None
    if is_path_option(name):
        return gr.File(label=control.label, file_types=["video"], type="filepath")
    if is_angle_path_option(name):
        return gr.Textbox(label=control.label, info=info, placeholder="e.g. 0, 20, -20")
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=control.label, info=info)
    if control.choices is not None:
        if default is None:
            return gr.Dropdown(["none", *control.choices], value="none", label=control.label, info=info)
        if len(control.choices) <= 3:
            return gr.Radio(list(control.choices), value=default, label=control.label, info=info)
        return gr.Dropdown(list(control.choices), value=default, label=control.label, info=info)
    if control.slider is not None:
        low, high, step = control.slider
        return gr.Slider(low, high, value=default, step=step, label=control.label, info=info)
    return gr.Number(value=default, precision=0, label=control.label, info=info)


def build_ui(studio, sessions=None, max_jobs: int = 1, viewer_token: str | None = None):
    """The page. ``viewer_token``: with a login (--auth), the secret the page hands its viewers (embedded player,
    viewer link): the stream and the videos need it or the login cookie."""
    import gradio as gr

    specs = user_options()
    names = [name for name, _, _ in specs]
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
        return [line, gr.update(value=note, visible=bool(note))] + [gr.update(interactive=usable)] * len(sadtalker_only)

    def generate(*args):
        """Generate a talking-head video; yields the job id (its live stream, which the embedded player follows)
        and the progress; the last output is the mp4."""
        image, audio, engine, *values, request = args  # the signature below says what Gradio passes
        image, audio = _uploaded_path(image), _uploaded_path(audio)
        raw = {name: _uploaded_path(value) if is_path_option(name) else value for name, value in zip(names, values)}
        try:
            job = studio.start(image, audio, options_from_user(raw), engine)
        except SadTalkerError as exc:
            # the reason stays on the progress line after the pop-up is gone
            yield gr.skip(), error_html(str(exc)), None, gr.skip()
            raise gr.Error(str(exc), title="Cannot start") from None
        session = getattr(request, "session_hash", None)
        if session:
            jobs_by_session[session] = job.id
            for other, other_job in list(jobs_by_session.items()):  # pages gone: forget jobs the studio forgot
                if studio.get(other_job) is None:
                    jobs_by_session.pop(other, None)
        yield job.id, progress_html(job.snapshot()), gr.skip(), gr.skip()
        try:
            for snap in job.updates(max_fps=PAGE_UPDATES_PER_S):
                if snap.state == "running":
                    yield gr.skip(), progress_html(snap), gr.skip(), gr.skip()
            if snap.state == "error":
                yield gr.skip(), progress_html(snap), gr.skip(), gr.skip()  # the reason stays after the pop-up
                raise gr.Error(snap.error or "Generation failed.", title="Generation failed")
            if snap.state == "cancelled":
                yield job.id, STOPPED_HTML, None, ""
                return
            yield job.id, progress_html(snap), snap.video_path, result_text(snap)  # the API's result names it too
        finally:
            if not job.finished:  # the page went away or an API client cancelled this event: stop the work too
                job.cancel()
            # the entry stays: Stop still finds the job while its live stream plays on

    # Gradio documents the endpoint (and injects the request) from the signature: image, audio, engine, one named
    # parameter per option with its default, then the request.
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    generate.__signature__ = inspect.Signature(
        [inspect.Parameter("image", positional), inspect.Parameter("audio", positional),
         inspect.Parameter("engine", positional, default="auto")]
        + [inspect.Parameter(name, positional, default=default) for name, default, _ in specs]
        + [inspect.Parameter("request", positional, default=None, annotation=gr.Request)])
    generate.__annotations__ = {"request": gr.Request}

    def image_uploaded(image):
        try:
            studio.prepare(_uploaded_path(image))
        except SadTalkerError as exc:
            gr.Warning(str(exc))

    def audio_uploaded(audio):
        try:
            studio.prepare_audio(_uploaded_path(audio))
        except SadTalkerError as exc:
            gr.Warning(str(exc))

    def stop(request: gr.Request = None):
        """Stop this page's job, at once: a running Generate then ends by itself and says so on the progress line
        (not Gradio's ``cancels``: a Generate clicked while a cancelled run is still ending would be lost), and a
        job whose video is done stops its live stream."""
        job = studio.get(jobs_by_session.get(getattr(request, "session_hash", None) or "", ""))
        if job is not None:
            job.cancel()

    stop.__annotations__ = {"request": gr.Request}  # resolved here: gradio injects the request by this annotation

    controls: dict[str, object] = {}
    with gr.Blocks(title="SadTalker Live", delete_cache=(900, 3600)) as demo:
        gr.Markdown("# SadTalker Live\nA portrait and a speech clip in, a talking-head video out — "
                    "watch it come alive while it renders.")
        with gr.Tab("Make a video", id="video"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    image = gr.Image(type="filepath", label="Portrait", sources=["upload", "clipboard"], height=300,
                                     elem_id="portrait")
                    audio = gr.Audio(type="filepath", sources=["upload", "microphone"], label="Speech", elem_id="speech")
                    engine_line = gr.Markdown(elem_id="engine-line")
                    engine = gr.Radio(list(ENGINE_CHOICES), value="auto", label="Engine",
                                      info="auto = SadTalker when its weights are installed, else Lite")
                    with gr.Accordion("SadTalker options", open=False):
                        options_note = gr.Markdown()
                        for name, default, control in specs:
                            if control.engines == "sadtalker":
                                controls[name] = option_control(name, default, control)
                    for name, default, control in specs:
                        if control.engines == "all":
                            controls[name] = option_control(name, default, control)
                    with gr.Row():
                        generate_button = gr.Button("Generate", variant="primary")
                        stop_button = gr.Button("Stop", variant="stop")
                with gr.Column(scale=1):
                    gr.HTML(live_player_html(None, viewer_token), elem_id="live")
                    # The job this page started: the embedded player, loaded once, is told to follow it
                    live_job = gr.Textbox(visible="hidden", elem_id="live-job", label="Live job")
                    progress = gr.HTML(progress_html(None))
                    gr.HTML(f'<a href="{html.escape(viewer_url(viewer_token))}" target="_blank" rel="noopener">'
                            'Open live viewer ↗</a> '
                            '— the same live picture and speech in a separate tab (open as many as you like).')
                    video = gr.Video(label="Result", interactive=False, height=360)
                    result = gr.Markdown()
            if EXAMPLE_IMAGE.is_file() and EXAMPLE_AUDIO.is_file():
                gr.Examples([[str(EXAMPLE_IMAGE), str(EXAMPLE_AUDIO)]], inputs=[image, audio],
                            label="Example (click to load, then Generate)")

        with gr.Tab("Live avatar", id="live-avatar"):
            live_avatar_tab(sessions, viewer_token)

        sadtalker_only = [controls[name] for name, _, control in specs if control.engines == "sadtalker"]
        describe_outputs = [engine_line, options_note, *sadtalker_only]
        demo.load(describe, inputs=[engine], outputs=describe_outputs, api_visibility="private", queue=False)
        engine.change(describe, inputs=[engine], outputs=describe_outputs, api_visibility="private", queue=False)
        generate_button.click(generate, inputs=[image, audio, engine, *(controls[name] for name in names)],
                                    outputs=[live_job, progress, video, result], api_name="generate",
                                    # a click waiting for its turn shows its queue position on the progress line
                                    show_progress="full", show_progress_on=[progress], concurrency_limit=max_jobs,
                                    # a click while the previous run is still ending (just after Stop) is kept and
                                    # runs when it has ended ("once" would drop it without a word)
                                    trigger_mode="always_last",
                                    # Our own loaders read the uploads: Gradio's image preprocessing would fail on a
                                    # non-image with a generic error instead of our message saying what to do.
                                    preprocess=False)
        stop_button.click(stop, api_visibility="private", queue=False)
        live_job.change(None, inputs=[live_job], js=FOLLOW_JOB_JS)
        # queued (not queue=False): a warning can only reach the page through the queue's event stream
        image.upload(image_uploaded, inputs=[image], api_visibility="private", preprocess=False,
                     show_progress="hidden", concurrency_limit=4)
        for arrived in (audio.upload, audio.stop_recording):
            arrived(audio_uploaded, inputs=[audio], api_visibility="private", preprocess=False,
                    show_progress="hidden", concurrency_limit=4)
    return demo


def live_player_html(job_id: str | None, token: str | None = None, empty: bool = False) -> str:
    """The live viewer, embedded: the stream's picture and speech at 25 fps on its clock (the newest before any)."""
    if empty:
        return ""
    query = f"embed=1&job={quote(job_id)}" if job_id else "embed=1"
    return (f'<iframe src="{html.escape(viewer_url(token, query))}" allow="autoplay; microphone" '
            f'title="Live picture and speech" data-job="{html.escape(job_id or "")}"></iframe>')


def viewer_url(token: str | None, query: str = "") -> str:
    """/viewer with the viewer token (a login is required) and ``query``."""
    parts = [part for part in (query, f"token={quote(token)}" if token else "") if part]
    return "/viewer" + ("?" + "&".join(parts) if parts else "")


def live_avatar_tab(sessions, viewer_token: str | None = None) -> None:
    """Portrait -> Start: an always-on face that speaks what you say into the microphone, type, or drop as a file."""
    import gradio as gr

    from live.session import SessionOptions

    if sessions is None:
        gr.Markdown("Live sessions are not available in this app.")
        return
    defaults = SessionOptions()
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown("An always-on talking face: it idles, and speaks whatever you say into the microphone, "
                        "type, or drop as a file — live, with its sound. The same session is reachable over the "
                        "HTTP API (README).")
            portrait = gr.Image(type="filepath", label="Portrait", sources=["upload", "clipboard"], height=260,
                                elem_id="live-portrait")
            engine = gr.Radio(["lite", "sadtalker"], value=defaults.engine, label="Engine", elem_id="live-engine",
                              info="lite = weight-free and light; sadtalker = SadTalker's own motion (needs its "
                                   "weights)")
            size = gr.Radio([256, 512], value=defaults.size, label="Size (pixels)")
            framing = gr.Radio(["crop", "full"], value=defaults.preprocess, label="Framing",
                               info="crop = the face, full = the whole portrait")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="live-start")
                end = gr.Button("End", variant="stop", elem_id="live-end")
            note = gr.Markdown()
        with gr.Column(scale=1):
            player = gr.HTML(elem_id="live-session")
    state = gr.State(None)

    def start_session(image, engine_value, size_value, framing_value, current):
        if current:
            sessions.delete(current)
        try:
            session = sessions.create(_uploaded_path(image) or "", SessionOptions(
                engine=engine_value, size=int(size_value), preprocess=framing_value).check())
        except SadTalkerError as exc:
            raise gr.Error(str(exc), title="Cannot start") from None
        return (live_player_html(session.id, viewer_token),
                f"Live session `{session.id}` ({engine_value}: {session.describe()['renderer_note']}) — talk, type "
                f"or drop a file in the player. API: `/api/sessions/{session.id}`.", session.id)

    def end_session(current):
        if current:
            sessions.delete(current)
        return live_player_html(None, empty=True), "Ended.", None

    start.click(start_session, inputs=[portrait, engine, size, framing, state], outputs=[player, note, state],
                api_visibility="private", preprocess=False, concurrency_limit=4)
    end.click(end_session, inputs=[state], outputs=[player, note, state], api_visibility="private")


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
        return error_html(snap.error or "Generation failed.")
    fraction = 1.0 if snap.state == "done" else (snap.done / snap.total if snap.total else 0.0)
    parts = [html.escape(snap.message or snap.stage)]
    if snap.total and snap.state == "running":
        parts.append(f"{snap.done}/{snap.total} frames")
        if snap.done < snap.total:
            parts.append(f"ETA {snap.eta_s:.1f} s" if snap.eta_s is not None else "ETA estimating…")
    parts.append(f"{snap.elapsed_s:.1f} s elapsed")
    return (f'<div class="stl-progress"><div style="width:{fraction * 100:.1f}%"></div></div>'
            f'<div class="stl-progress-text">{" · ".join(parts)}</div>')


def error_html(message: str) -> str:
    return ('<div class="stl-progress"><div style="width:0%"></div></div>'
            f'<div class="stl-progress-text stl-error">{html.escape(message)}</div>')


STOPPED_HTML = ('<div class="stl-progress"><div style="width:0%"></div></div>'
                '<div class="stl-progress-text">Stopped — nothing was saved. Generate to start again.</div>')


def result_text(snap) -> str:
    return (f"**Done** — {snap.duration_s:.1f} s video made by the **{snap.engine}** engine "
            f"in {snap.elapsed_s:.1f} s. [Download the mp4]({snap.video_url})")
