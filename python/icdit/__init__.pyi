from os import PathLike
from typing import Callable, Literal, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, PathLike[str]]

class IcditError(RuntimeError):
    """A failure inside icdit (bad model file, device error, non-finite values, ...)."""

class Cancelled(IcditError):
    """``Engine.cancel()`` stopped the request before it finished."""

class Engine:
    """A model opened once, with every buffer a request needs.

    Every argument is optional and defaults as ``icdit sample`` does: the bundled model, the
    sampler, steps and guidance its file recommends (else DDPM, 250 steps, guidance 4), no
    caching, the CPU backend, up to 16 images per request.
    """

    def __init__(
        self,
        weights: Optional[_Path] = None,
        factors: Optional[_Path] = None,
        vae: Optional[_Path] = None,
        backend: Literal["cpu", "cuda", "emu"] = "cpu",
        max_batch: int = 16,
        steps: Optional[int] = None,
        respacing: Optional[str] = None,
        sampler: Optional[Literal["ddpm", "ddim"]] = None,
        eta: float = 0.0,
        cfg: Optional[float] = None,
        cache: Literal["none", "reuse", "icc", "fora", "taylor"] = "none",
        period: int = 2,
        full_steps: Optional[Sequence[int]] = None,
        threads: int = 0,
        rounding: Literal["dit", "diffusers"] = "dit",
        check_finite: bool = True,
        device: int = 0,
    ) -> None: ...
    def sample(
        self,
        classes: Sequence[int],
        seed: int = 0,
        cfg: Optional[float] = None,
        *,
        first_index: int = 0,
        output: Literal["pixels", "latents"] = "pixels",
        out: Optional[np.ndarray] = None,
        progress: Optional[Callable[[int, int], object]] = None,
        preview: Optional[
            Callable[[int, int, npt.NDArray[np.float32], Optional[npt.NDArray[np.uint8]]], object]
        ] = None,
    ) -> np.ndarray:
        """One image per class: uint8 pixels (N, H, W, C), or float32 latents (N, C, I, I)
        with ``output="latents"``. ``out`` is filled instead of a new array when given.
        ``progress(step, total)`` runs after each step; ``preview(step, total, x0, pixels)``
        receives the current denoised estimate (latent layout, and uint8 NHWC pixels for
        pixel-space models). ``cfg`` other than the engine's re-plans it for this scale."""
    def sample_latents(
        self,
        classes: Sequence[int],
        seed: int = 0,
        cfg: Optional[float] = None,
        *,
        first_index: int = 0,
        out: Optional[npt.NDArray[np.float32]] = None,
        progress: Optional[Callable[[int, int], object]] = None,
        preview: Optional[
            Callable[[int, int, npt.NDArray[np.float32], Optional[npt.NDArray[np.uint8]]], object]
        ] = None,
    ) -> npt.NDArray[np.float32]: ...
    def cancel(self) -> None:
        """Stops the request in progress (or the next one) before its next step; it raises
        ``Cancelled``. Safe from any thread."""
    @property
    def num_classes(self) -> int: ...
    @property
    def max_batch(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def cfg(self) -> float: ...
    @property
    def image_shape(self) -> Optional[tuple[int, int, int]]: ...
    @property
    def latent_shape(self) -> tuple[int, int, int]: ...
    @property
    def class_names(self) -> Optional[list[str]]: ...
    @property
    def previews(self) -> bool: ...
    @property
    def device(self) -> str: ...

def calibrate(
    out: _Path,
    *,
    weights: Optional[_Path] = None,
    method: Literal["svd", "ca-svd", "cd-svd"] = "ca-svd",
    rank: int = 128,
    calib_self: Optional[int] = None,
    seed: int = 0,
    threads: int = 0,
) -> _Path:
    """Rank-r factors for ``Engine(cache="icc", factors=...)``, written to ``out``."""
