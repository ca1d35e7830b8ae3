"""The engine: model loading, devices and dtypes, the LCM pipelines, decoders, LoRA and the step hook.

Import the submodules directly (``from lcm_live.engine.request import GenerationRequest``); this package
imports nothing heavy.
"""
