"""lcm-live: real-time image generation with Latent Consistency Models, on your own machine.

Importing this package is free: no torch, no model loading, no device probing.
"""

__version__ = "0.1.0"
