"""Standard live outputs of every stream (a job of the page, a live session), on the app's port:

    POST   /whep/{id}             SDP offer -> 201 + SDP answer + Location   watch over WebRTC (video + Opus audio)
    DELETE /whep/{id}/{resource}                                            hang up
    POST   /whip/{id}             SDP offer with a microphone -> 201 ...    speak into a live session over WebRTC
    DELETE /whip/{id}/{resource}
    GET    /hls/{id}/index.m3u8   H.264 + AAC in 1 s segments (started on the first request, ended when nobody asks)

RTMP push is not a route: a session created with ``rtmp_url``, or ``serve --rtmp-url`` for the page's stream.
The same admission rules as the WebSocket stream apply (the app's pages, allowed origins, local scripts, token).
"""
from __future__ import annotations

import asyncio
import os
import threading
import time

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response

from live.outputs import HlsOutput
from live.stream import StreamHub
from live.webrtc import SdpError, WebRtcPeers

from .guard import refusal_response

HLS_WAIT_S = 12.0  # the first request waits this long for the first segments
HLS_IDLE_S = 60.0  # an HLS output nobody requested for this long is stopped (its files removed)


def add_transport_routes(app, hub: StreamHub, broadcaster, sessions, folder: str, access=None) -> WebRtcPeers:
    peers = WebRtcPeers()
    hls: dict[str, HlsOutput] = {}
    hls_lock = threading.Lock()

    def refused(request: Request):
        return refusal_response(broadcaster, request, access, app)

    def unknown(stream_id: str):
        return JSONResponse({"error": f"No live stream {stream_id!r} (a job or a session id)."}, status_code=404)

    async def offer_of(request: Request) -> str:
        body = (await request.body()).decode("utf-8", "replace")
        return body

    @app.post("/whep/{stream_id}", include_in_schema=False)
    async def whep(stream_id: str, request: Request):
        if (denied := refused(request)) is not None:
            return denied
        stream = hub.get(stream_id)
        if stream is None or stream.ended.is_set():
            return unknown(stream_id)
        try:
            resource, answer = await peers.watch(stream, await offer_of(request))
        except SdpError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return Response(answer, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/whep/{stream_id}/{resource}"})

    @app.post("/whip/{stream_id}", include_in_schema=False)
    async def whip(stream_id: str, request: Request):
        if (denied := refused(request)) is not None:
            return denied
        session = sessions.get(stream_id) if sessions is not None else None
        if session is None:
            return JSONResponse({"error": f"No live session {stream_id!r} to speak into."}, status_code=404)
        try:
            resource, answer = await peers.speak(session, session.stream, await offer_of(request))
        except SdpError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return Response(answer, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/whip/{stream_id}/{resource}"})

    async def hang_up(resource: str, request: Request):
        if (denied := refused(request)) is not None:
            return denied
        if not await peers.close(resource):
            return JSONResponse({"error": "No such WebRTC connection."}, status_code=404)
        return Response(status_code=200)

    @app.delete("/whep/{stream_id}/{resource}", include_in_schema=False)
    async def whep_delete(stream_id: str, resource: str, request: Request):
        return await hang_up(resource, request)

    @app.delete("/whip/{stream_id}/{resource}", include_in_schema=False)
    async def whip_delete(stream_id: str, resource: str, request: Request):
        return await hang_up(resource, request)

    def hls_output(stream_id: str) -> HlsOutput | None:
        stream = hub.get(stream_id)
        if stream is None or stream.ended.is_set():
            return None
        with hls_lock:
            output = hls.get(stream_id)
            if output is None:
                output = hls[stream_id] = HlsOutput(stream, os.path.join(folder, stream_id))
                stream.attach(output)
            output.last_request = time.monotonic()
            return output

    @app.get("/hls/{stream_id}/{name}", include_in_schema=False)
    async def hls_file(stream_id: str, name: str, request: Request):
        if (denied := refused(request)) is not None:
            return denied
        if "/" in name or name.startswith(".") or not (name == "index.m3u8" or name.endswith(".ts")):
            return JSONResponse({"error": "Not an HLS file."}, status_code=404)
        output = await asyncio.to_thread(hls_output, stream_id)
        if output is None:
            return unknown(stream_id)
        path = os.path.join(output.folder, name)
        deadline = time.monotonic() + (HLS_WAIT_S if name == "index.m3u8" else 0.0)
        while not os.path.isfile(path) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if not os.path.isfile(path):
            return JSONResponse({"error": f"{name} is not (or no longer) in the live window."}, status_code=404)
        kind = "application/vnd.apple.mpegurl" if name.endswith(".m3u8") else "video/mp2t"
        return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})

    def reap_hls() -> None:
        while True:
            time.sleep(5.0)
            with hls_lock:
                idle = [sid for sid, out in hls.items()
                        if time.monotonic() - out.last_request > HLS_IDLE_S or hub.get(sid) is None
                        or hub.get(sid).ended.is_set()]
                outputs = [hls.pop(sid) for sid in idle]
            for output in outputs:
                output.close()

    threading.Thread(target=reap_hls, name="hls-reaper", daemon=True).start()
    return peers
