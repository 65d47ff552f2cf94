"""The live routes of the app (sessions, WebRTC, HLS) on a real HTTP server (uvicorn, port 0), with a real
broadcaster, stream hub and session manager: what the app's serve wires up, without the Gradio page."""
from __future__ import annotations

import json
import threading
import time

import httpx

from core.landmarks import shared_detector
from live.broadcaster import Broadcaster
from live.session import SessionManager
from live.stream import StreamHub

from .paths import EXAMPLE_IMAGE, free_port


class Server:
    """The session routes of the app on a real HTTP server, with a real broadcaster and session manager."""

    def __init__(self, tmp_path, max_sessions=3, idle_minutes=30.0, checkpoint_dir=None):
        import uvicorn
        from fastapi import FastAPI

        from web.sessions import add_session_routes
        from web.transports import add_transport_routes

        self.broadcaster = Broadcaster(port=0).start()
        self.hub = StreamHub(self.broadcaster)
        self.sessions = SessionManager(self.broadcaster, str(tmp_path / "sessions"), shared_detector,
                                       max_sessions=max_sessions, idle_minutes=idle_minutes, reap_every_s=0.2,
                                       hub=self.hub, checkpoint_dir=checkpoint_dir)
        self.broadcaster.speech_handler = lambda sid, samples, final: self.sessions.get(sid).speak(samples, final)
        app = FastAPI()
        add_session_routes(app, self.sessions, self.broadcaster, ws_port=self.broadcaster.port)
        self.peers = add_transport_routes(app, self.hub, self.broadcaster, self.sessions, str(tmp_path / "hls"))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def create(self, options: dict | None = None, image=EXAMPLE_IMAGE, rtmp_url: str | None = None) -> dict:
        files = {"image": ("portrait.png", open(image, "rb"), "image/png")}
        data = {"options": json.dumps(options)} if options else {}
        if rtmp_url:
            data["rtmp_url"] = rtmp_url
        response = self.http.post("/api/sessions", files=files, data=data)
        assert response.status_code == 201, response.text
        return response.json()

    def close(self):
        self.sessions.close()
        self.hub.close_all()
        self._server.should_exit = True
        self._thread.join(10)
        self.broadcaster.stop()
