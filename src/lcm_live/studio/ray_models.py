"""What the generator replicas hold, as the ingress's :class:`~lcm_live.studio.ray_worker.RayWorker` learns it: the
engine a replica describes (the app's schema and info, the settings resolved for its model), read again every few
seconds (an update may change the model), and each model preset's readiness by replica for ``GET /api/models``:
the presets a replica says it holds (in its description and in each request's last event) and its ``model`` events
(loading, ready, error), which also go to the session's sink as in one process."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lcm_live.config import StudioSettings
from lcm_live.studio.ray_wire import RemoteEngine
from lcm_live.studio.worker import Job

log = logging.getLogger("lcm_live.studio")


class ReplicaModels:
    """Mixed into RayWorker: uses its ``_handle``, ``_state``, ``detail``, ``settings``, ``max_batch_size``,
    ``_described``, ``_on_ready`` and ``_models``."""

    async def _connect(self) -> None:
        """Until a replica answers: its engine's info and resolved settings make the app's schema, then ready."""
        while self._state == "loading":
            try:
                described = await self._handle.describe.remote()
            except Exception as exc:  # no replica yet, or one that failed to load: Serve retries, so do we
                self.detail = f"waiting for a generator replica ({type(exc).__name__}: {str(exc)[:200]})"
                await asyncio.sleep(1.0)
                continue
            self._describe(described)
            if self._state == "loading":
                self._state, self.detail = "ready", "ready"

    def _describe(self, described: dict[str, Any]) -> None:
        """What a replica loaded: the app's schema and info, and the settings resolved for that model."""
        described = dict(described)
        self._held(described.pop("held", None))
        self._described = described
        self.settings = StudioSettings.model_validate(described["settings"])
        self.max_batch_size = described["max_batch_size"]
        if self._on_ready is not None:
            self._on_ready(RemoteEngine(described["info"], described["lcm_img2img"]))

    async def _redescribe(self) -> None:
        """During an update (``serve deploy`` with another model) the first answer may come from a replica of the
        old version: read again, and follow what the replicas now hold."""
        try:
            described = await self._handle.describe.remote()
        except Exception:  # no replica now: the next tick reads again
            return
        self._held(described.get("held"))
        if {k: v for k, v in described.items() if k != "held"} != self._described:
            log.info("studio: the generator replicas now hold %s", described["info"].get("model"))
            self._describe(described)

    def _held(self, held: dict[str, Any] | None) -> None:
        """A replica says which presets it holds: each one's readiness on that replica (GET /api/models)."""
        if self._models is None or not held:
            return
        replica, loaded = held["replica"], held["loaded"]
        for name in self._models.names:
            if name in loaded:
                self._models.mark_loaded(name, replica, loaded[name])
            else:
                self._models.mark_evicted(name, replica)

    def _model_event(self, job: Job, event: tuple) -> None:
        """``("model", name, state, progress, message, detail, replica)``: to the session, and the readiness."""
        _, name, state, progress, message, detail, replica = event
        if self._models is not None and name in self._models.names:
            if state == "loading":
                self._models.mark_loading(name, replica)
            elif state == "ready":
                self._models.mark_loaded(name, replica, None)
            elif state == "error":
                self._models.mark_failed(name, replica, message)
        on_model = getattr(job.sink, "on_model", None)  # optional in the JobSink protocol
        if on_model is not None:
            on_model(job, name, state, progress, message, **detail)
