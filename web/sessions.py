"""HTTP API of live sessions, on the app's port (the README documents it with curl examples).

    POST   /api/sessions                     multipart: image, options (JSON)      -> 201 {session, viewer_url, ws_url}
    POST   /api/sessions/{id}/speech[?final=1]  an audio file, or audio/L16; rate=N  -> 202 {queued_s}
    POST   /api/sessions/{id}/say            {"text": ..., "voice": "en"}          -> 202 {queued_s, seconds}
    GET    /api/sessions/{id}                state, speech queued, frames sent, late frames, viewers, uptime
    GET    /api/sessions/{id}/recording.mp4  everything the session has shown and said so far (H.264 + AAC)
    DELETE /api/sessions/{id}                ends it

Errors a client can fix are 400 with ``{"error": message}`` (the same messages the page gives), an unknown session
404, too many sessions 429. Browsers from other origins get 403, like the live stream itself.
"""
from __future__ import annotations

import asyncio
import os
import tempfile

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from core.audio import decode_audio_bytes, pcm_from_raw
from core.errors import DependencyError, InputError
from live.session import SessionLimitError, SessionManager, SessionOptions

from .guard import refusal_response

MAX_UPLOAD_BYTES = 50 * 2 ** 20  # a portrait or a speech chunk larger than this is refused


def add_session_routes(app, sessions: SessionManager, broadcaster, ws_port: int, access=None) -> None:
    def refused(request: Request):
        return refusal_response(broadcaster, request, access, app)

    def error(message: str, status: int = 400):
        return JSONResponse({"error": message}, status_code=status)

    def find(session_id: str):
        session = sessions.get(session_id)
        return session, (None if session is not None else error(f"No live session {session_id!r}; it may have "
                                                                  "ended (DELETE, or idle too long).", 404))

    def describe(session, request: Request) -> dict:
        host = request.url.hostname or "127.0.0.1"
        ws_host = f"[{host}]" if ":" in host else host
        return {**session.describe(), "viewer_url": f"/viewer?job={session.id}",
                "ws_url": f"ws://{ws_host}:{ws_port}/", "recording_url": f"/api/sessions/{session.id}/recording.mp4",
                "whep_url": f"/whep/{session.id}", "whip_url": f"/whip/{session.id}",
                "hls_url": f"/hls/{session.id}/index.m3u8",
                "viewers": broadcaster.viewers_of(session.id) if broadcaster is not None else 0}

    @app.post("/api/sessions", include_in_schema=False)
    async def create(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        try:
            form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
        except Exception as exc:  # not multipart, or a part too large
            return error(f"Send the portrait as multipart form data (field 'image'): {exc}")
        upload = form.get("image")
        if upload is None or not hasattr(upload, "read"):
            return error("Add the portrait as the multipart field 'image' (jpg or png, one face).")
        data = await upload.read()
        try:
            options = SessionOptions.from_json(form.get("options"))
            rtmp_url = form.get("rtmp_url") or request.query_params.get("rtmp_url") or None
            with tempfile.NamedTemporaryFile(suffix=os.path.splitext(upload.filename or "")[1] or ".img") as file:
                file.write(data)
                file.flush()
                session = await asyncio.to_thread(sessions.create, file.name, options, rtmp_url)
        except SessionLimitError as exc:
            return error(str(exc), 429)
        except InputError as exc:
            return error(str(exc))
        return JSONResponse(describe(session, request), status_code=201)

    @app.post("/api/sessions/{session_id}/speech", include_in_schema=False)
    async def speech(session_id: str, request: Request):
        if (denied := refused(request)) is not None:
            return denied
        session, missing = find(session_id)
        if missing is not None:
            return missing
        final = request.query_params.get("final", "0").lower() in ("1", "true", "yes")
        body = await request.body()
        if len(body) > MAX_UPLOAD_BYTES:
            return error(f"The speech chunk is larger than {MAX_UPLOAD_BYTES >> 20} MB; send it in pieces.")
        try:
            samples = await asyncio.to_thread(decode_speech, body, request.headers.get("content-type", ""), final)
            session.speak(samples, final=final)
        except InputError as exc:
            return error(str(exc))
        return JSONResponse({"session": session.id, "queued_s": round(session.speech.seconds_queued(), 3),
                             "final": final}, status_code=202)

    @app.post("/api/sessions/{session_id}/say", include_in_schema=False)
    async def say(session_id: str, request: Request):
        if (denied := refused(request)) is not None:
            return denied
        session, missing = find(session_id)
        if missing is not None:
            return missing
        try:
            payload = await request.json()
        except ValueError:
            return error('Send JSON: {"text": "what to say"}.')
        if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
            return error('Send JSON with the text to say: {"text": "Hello there"}.')
        try:
            from core.tts import synthesize

            samples = await asyncio.to_thread(synthesize, payload["text"], payload.get("voice") or "en")
            session.speak(samples, final=True)
        except DependencyError as exc:
            return error(str(exc), 503)
        except InputError as exc:
            return error(str(exc))
        return JSONResponse({"session": session.id, "seconds": round(samples.size / 16000, 3),
                             "queued_s": round(session.speech.seconds_queued(), 3)}, status_code=202)

    @app.get("/api/sessions/{session_id}", include_in_schema=False)
    async def state(session_id: str, request: Request):
        if (denied := refused(request)) is not None:
            return denied
        session, missing = find(session_id)
        return missing if missing is not None else JSONResponse(describe(session, request))

    @app.get("/api/sessions/{session_id}/recording.mp4", include_in_schema=False)
    async def recording(session_id: str, request: Request):
        if (denied := refused(request)) is not None:
            return denied
        session, missing = find(session_id)
        if missing is not None:
            return missing
        folder = tempfile.mkdtemp(prefix="recording-")
        path = os.path.join(folder, "recording.mp4")
        try:
            await asyncio.to_thread(session.recording_snapshot, path)
        except (InputError, RuntimeError) as exc:
            os.rmdir(folder) if not os.listdir(folder) else None
            return error(str(exc), 409 if isinstance(exc, RuntimeError) else 400)
        return FileResponse(path, media_type="video/mp4", filename=f"session-{session.id}.mp4",
                            background=BackgroundTask(_remove_folder, folder))

    @app.delete("/api/sessions/{session_id}", include_in_schema=False)
    async def delete(session_id: str, request: Request):
        if (denied := refused(request)) is not None:
            return denied
        if not await asyncio.to_thread(sessions.delete, session_id):
            return error(f"No live session {session_id!r}.", 404)
        return JSONResponse({"session": session_id, "state": "closed"})


def decode_speech(body: bytes, content_type: str, final: bool):
    """A chunk of speech from its bytes and Content-Type: raw PCM (``audio/L16; rate=N[; channels=C]``, big-endian
    as RFC 2586 says; ``audio/x-s16le; rate=N`` for little-endian) or any audio file ffmpeg decodes."""
    import numpy as np

    kind, params = _content_type(content_type)
    if not body:
        if final:
            return np.zeros(0, np.float32)  # "that was the end of the utterance"
        raise InputError("The speech chunk is empty: send audio in the request body (or ?final=1 to end an "
                         "utterance).")
    if kind in ("audio/l16", "audio/x-s16le", "audio/x-s16be"):
        try:
            rate = int(params.get("rate", ""))
            channels = int(params.get("channels", "1"))
        except ValueError:
            raise InputError(f"{content_type!r}: say the sample rate, e.g. Content-Type: audio/L16; rate=16000."
                             ) from None
        return pcm_from_raw(body, rate, channels, big_endian=kind != "audio/x-s16le")
    return decode_audio_bytes(body)


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    parts = [p.strip() for p in (value or "").split(";")]
    params = {}
    for part in parts[1:]:
        if "=" in part:
            key, _, val = part.partition("=")
            params[key.strip().lower()] = val.strip().strip('"')
    return parts[0].lower(), params



def _remove_folder(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
