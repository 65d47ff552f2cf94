"""HTTP routes beside the Gradio page: the live viewer and the finished videos.

No postponed annotations here: FastAPI reads the handlers' ``Request`` annotation (imported lazily) at run time.
"""

import html
import os
from pathlib import Path

from live.job_folders import VIDEO_NAME, is_job_folder_name

from .access import Access

VIEWER_HTML = Path(__file__).resolve().parent.parent / "streaming_client.html"
LOGIN_NEEDED = "Log in on the app's page first, or open this link from there (it carries the viewer token).\n"


def add_routes(app, outputs_dir: str, ws_port: int, app_port: int, access: Access | None = None) -> None:
    """The viewer page and the finished videos, served by the same HTTP server as the Gradio page. With a login
    (``--auth``), both take the login cookie or the viewer token."""
    from fastapi import Request
    from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse

    access = access or Access("127.0.0.1")
    page = VIEWER_HTML.read_text(encoding="utf-8").replace(
        'data-ws-port="" data-app-port=""', f'data-ws-port="{ws_port}" data-app-port="{app_port}"', 1)
    # A logged-in browser that opens /viewer without the token gets it in the page (for the WebSocket and videos).
    with_token = page.replace('data-token=""', f'data-token="{html.escape(access.token or "")}"', 1)

    def refused() -> PlainTextResponse:
        return PlainTextResponse(LOGIN_NEEDED, status_code=401, headers={"Cache-Control": "no-store"})

    @app.get("/viewer", response_class=HTMLResponse, include_in_schema=False)
    def viewer(request: Request):
        if not access.allows(app, request):
            return refused()
        return HTMLResponse(with_token, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    os.makedirs(outputs_dir, exist_ok=True)

    @app.get("/outputs/{job}/{name}", include_in_schema=False)
    def output(job: str, name: str, request: Request):
        # Only a finished job's video: never a partial file, the lock file or anything else in the folder.
        path = os.path.join(outputs_dir, job, VIDEO_NAME)
        if not access.allows(app, request):
            return refused()
        if name != VIDEO_NAME or not is_job_folder_name(job) or not os.path.isfile(path):
            return PlainTextResponse("No such video (it may have been pruned: see --keep-outputs).\n",
                                     status_code=404)
        return FileResponse(path, media_type="video/mp4", headers={"Cache-Control": "private, no-cache"})
