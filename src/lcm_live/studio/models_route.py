"""``GET /api/models``: the model presets a request may name in ``model``, each with its readiness and its styles
(studio/models.py), behind the same token and Host rules as the other JSON routes. Names only, never a path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

if TYPE_CHECKING:
    from lcm_live.studio.app import StudioState


def add_models_route(app: FastAPI, studio: StudioState, dependencies: list) -> None:
    @app.get("/api/models", dependencies=dependencies)
    async def api_models() -> dict[str, Any]:
        return {"models": studio.models.public()}
