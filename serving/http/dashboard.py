"""The operator dashboard: GET /dashboard (one HTML page) and GET /dashboard/static/{name} (its script, its style
and the vendored uPlot), all from serving/http/dashboard/; no CDN, so the page works on an air-gapped host.

The page reads nothing but the daemon's own /metrics (same origin), every 2 s, and computes rates and quantiles
in the browser. NOTE: /dashboard and /metrics are operator endpoints and, like /metrics in vLLM, need no API key
(they work with `auth: none` and with `auth: keys` alike); they show fleet totals by tenant, so publish the HTTP
port only where operators may see those. uPlot is copied out of npm by `make dashboard`; until it has run, the
page answers 503 naming that target instead of drawing a broken page.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response

ASSETS_DIR = Path(__file__).with_name("dashboard")
# NOTE: revalidate every load (the ETag makes that a 304): a daemon upgraded in place must not keep serving
# last version's script from the browser's cache.
_CACHE_CONTROL = "no-cache"
# Everything the page loads comes from this daemon; a stray CDN reference fails loudly in the console.
_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'"


@dataclasses.dataclass(frozen=True, slots=True)
class Asset:
    path: str  # relative to ASSETS_DIR
    media_type: str  # Content-Type, charset included
    built: bool = False  # made by `make dashboard` (not in git), so it may be missing


_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"
PAGE = Asset("index.html", "text/html; charset=utf-8")
STATIC: dict[str, Asset] = {  # the only names /dashboard/static/ serves
    "dashboard.js": Asset("dashboard.js", _JS),
    "exposition.js": Asset("exposition.js", _JS),
    "dashboard.css": Asset("dashboard.css", _CSS),
    "uPlot.iife.min.js": Asset("vendor/uPlot.iife.min.js", _JS, built=True),
    "uPlot.min.css": Asset("vendor/uPlot.min.css", _CSS, built=True),
}


def missing_assets(assets_dir: Path) -> list[str]:
    """The page's files that are not on disk (the vendored ones, before `make dashboard`)."""
    return [a.path for a in (PAGE, *STATIC.values()) if not (assets_dir / a.path).is_file()]


def _file(request: Request, path: Path, media_type: str, headers: dict[str, str]) -> Response:
    """The file, or 304 when the browser's copy (If-None-Match) is current."""
    stat = path.stat()
    etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
    headers = {**headers, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers, stat_result=stat)


def dashboard_router(assets_dir: Path = ASSETS_DIR) -> APIRouter:
    """The routes, reading their files from `assets_dir` on every request (so `make dashboard` on a running
    daemon fixes a 503 without a restart)."""
    router = APIRouter(include_in_schema=False)
    headers = {"Cache-Control": _CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}

    def not_built() -> Response | None:
        missing = missing_assets(assets_dir)
        if not missing:
            return None
        return PlainTextResponse(
            f"The dashboard is not built: {', '.join(missing)} missing under {assets_dir}. Run `make dashboard` "
            "(npm ci, then copies uPlot into serving/http/dashboard/vendor/) and reload.",
            status_code=503, headers={"Cache-Control": "no-store", "Retry-After": "10"})

    @router.api_route("/dashboard", methods=["GET", "HEAD"])
    async def page(request: Request) -> Response:
        return not_built() or _file(request, assets_dir / PAGE.path, PAGE.media_type,
                                    {**headers, "Content-Security-Policy": _CSP})

    @router.api_route("/dashboard/static/{name}", methods=["GET", "HEAD"])
    async def static(name: str, request: Request) -> Response:
        asset = STATIC.get(name)
        if asset is None:
            return PlainTextResponse(f"no dashboard file {name!r}; the page uses {', '.join(sorted(STATIC))}",
                                     status_code=404)
        return not_built() or _file(request, assets_dir / asset.path, asset.media_type, headers)

    return router
