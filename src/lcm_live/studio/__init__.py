"""The studio: `lcm-live serve`'s FastAPI app, WebSocket sessions, the inference worker, limits and metrics.

``create_app`` lives in :mod:`lcm_live.studio.app`; this package imports nothing heavy.
"""
