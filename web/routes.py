"""HTTP routes beside the Gradio page: the live viewer and the finished videos."""
from __future__ import annotations

import os
from pathlib import Path

VIEWER_HTML = Path(__file__).resolve().parent.parent / "streaming_client.html"


def add_routes(app, outputs_dir: str, ws_port: int, app_port: int) -> None:
    """The viewer page and the finished videos, served by the same HTTP server as the Gradio page."""
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    page = VIEWER_HTML.read_text(encoding="utf-8").replace(
        'data-ws-port="" data-app-port=""', f'data-ws-port="{ws_port}" data-app-port="{app_port}"', 1)

    @app.get("/viewer", response_class=HTMLResponse, include_in_schema=False)
    def viewer() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    os.makedirs(outputs_dir, exist_ok=True)
    app.mount("/outputs", StaticFiles(directory=outputs_dir), name="outputs")
