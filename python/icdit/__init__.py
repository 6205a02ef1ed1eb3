"""icdit: class-conditional DiT sampling with increment-calibrated caching.

    import icdit
    engine = icdit.Engine()                 # the bundled model, its recommended settings
    images = engine.sample([1, 2], seed=0)  # uint8 (2, 32, 32, 3), as `icdit sample --class 1,2`

The engine is a Rust library: every buffer is allocated when the Engine is made, the GIL
is released while it samples, and Ctrl-C (or ``Engine.cancel()`` from another thread) stops
a request between steps.
"""

from ._icdit import Cancelled, Engine, IcditError, __version__, calibrate

__all__ = ["Engine", "IcditError", "Cancelled", "calibrate", "__version__"]
