"""The worker's side of model switches (studio/worker.py's :class:`~lcm_live.studio.worker.Worker` has these):
jobs whose preset is not loaded wait ("parked") while the loader thread loads it (studio/loader.py), and the
worker thread, between its generations, installs what was loaded and puts those jobs back in their mailboxes.

Only the worker thread evicts (studio/switching.py): no generation runs on it meanwhile, so an engine in use is never
freed. Before a load, only engines that no other slot's last frame (nor a waiting job) used are evicted: with
``--max-loaded-models 1`` the engine other sessions still use stays during the load, so two models are in memory
until the new one is installed; the least recently used is evicted then (those sessions' next frames load theirs
again: with two sessions on two presets, raise ``--max-loaded-models`` to 2).
"""

from __future__ import annotations

import time
from typing import Any

from lcm_live.errors import UserError
from lcm_live.studio.jobs import Job
from lcm_live.studio.loader import LoadTask, tell

SLOTS_REMEMBERED = 1024  # slots whose last preset is kept from eviction (REST slots are never closed: bounded)


class ModelSlots:
    """Mixed into Worker: uses its ``_cond``, ``_pending``, ``_order``, ``_running``, ``_parked``, ``switcher``,
    ``loader``, ``models``, ``engine`` and ``_fail``."""

    def _select_engine(self, jobs: list[Job]) -> bool:
        """``self.engine`` := the engine of the jobs' preset (one batch key: one preset); False when the jobs wait
        for it to load (parked: the loader thread loads it, this thread serves the others) or the style scales
        cannot be set (the jobs failed)."""
        name = self.models.name_of(jobs[0].params.model)
        if not self.switcher.has(name):
            self._park(name, jobs)
            return False
        try:
            scales = self.models.resolve_scales(name, dict(jobs[0].params.lora_scales))
            self.engine = self.switcher.select(name, scales)
            with self._cond:
                for slot in self._running:
                    self._slot_models[slot] = name  # this slot's frames use it: not evicted before a load
                    self._slot_models.move_to_end(slot)
                while len(self._slot_models) > SLOTS_REMEMBERED:
                    self._slot_models.popitem(last=False)
            return True
        except UserError as exc:
            field = exc.field if (exc.field or "").startswith("lora_scales") else "lora_scales"  # a style's load
            for job in jobs:
                self._fail(job, "invalid_params", exc.message, field)
        return False

    def _park(self, name: str, jobs: list[Job]) -> None:
        """The jobs wait for preset ``name``: a load joined or queued, after room was made for it."""
        with self._cond:
            slots = {id(job): slot for slot, job in self._running.items()}
            wanted = {self.models.name_of(j.params.model) for j in [*self._pending.values(), *self._running.values()]
                      if j not in jobs}
            mine = {slots[id(job)] for job in jobs}
            wanted |= {preset for slot, preset in self._slot_models.items() if slot not in mine}
        if not self.loader.loading(name):
            self.switcher.make_room(wanted)
            self._forget_evicted()
            self.models.mark_loading(name, self.name)
        with self._cond:
            for job in jobs:
                slot = slots[id(job)]
                self._parked[slot] = (name, job)
                self.loader.request(name, slot, job)

    def _forget_evicted(self) -> None:
        if self.engine is not None and all(e.engine is not self.engine for e in self.switcher.engines.values()):
            self.engine = None  # an evicted engine must not stay referenced here (its memory is to be freed)

    def _load_finished(self, task: LoadTask, engine: Any, error: str | None) -> None:
        """(The loader thread) a load ended: the worker thread installs it."""
        with self._cond:
            self._installs.append((task, engine, error))
            self._cond.notify()

    def _install(self, task: LoadTask, engine: Any, error: str | None) -> None:
        """(This thread: no generation runs meanwhile, so evicting is safe) hold a loaded engine, put its waiting
        jobs back in their mailboxes (first in the round-robin: they waited longest), or fail them."""
        name = task.name
        if engine is not None:
            self.switcher.install(name, engine)
            self._forget_evicted()
        elif error is None:
            self.models.mark_cancelled(name, self.name)
        now = time.monotonic()
        for slot, job in task.waiters.items():
            with self._cond:
                if self._parked.get(slot, (None, None))[1] is not job:
                    continue  # replaced meanwhile: told already
                del self._parked[slot]
                requeue = engine is not None and job.cancel_reason is None and slot not in self._pending
                if requeue:
                    job.submitted = now  # the load was not a wait for this worker
                    self._pending[slot] = job
                    self._order.appendleft(slot)
            if requeue:
                tell([job], name, "ready", 1.0, f"{name} is ready")
            elif error is not None:
                tell([job], name, "error", None, error)
                self._fail(job, "model_unavailable", f"the model {name!r} could not be loaded: {error}", "model")
            else:
                job.sink.on_done(job, "cancelled" if job.cancel_reason or engine is None else "replaced")
