"""Progress, interrupt and preview hooks for the core loops.

The core never imports ComfyUI. Every loop calls ``callbacks.check()`` before each model evaluation (the node layer
puts ComfyUI's ``throw_exception_if_processing_interrupted`` there, so Cancel stops within one step) and
``callbacks.step(x0)`` after each finished step, with the current predicted clean latent ``x0``
``[1, 4, F, h, w]`` (scaled, diffusers convention) for previews, or ``None`` where there is nothing to preview.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Callbacks:
    """Hooks a loop reports to. Both are optional; ``Callbacks()`` does nothing.

    progress: called as ``progress(x0)`` after every step of every loop (sampling, inversion, fixed-point
        iterations count as part of their step, VAE chunks); ``x0`` is a scaled latent ``[1,4,F,h,w]`` or None.
    interrupt: called before every model evaluation; raises to stop (ComfyUI's interrupt exception).
    """
    progress: Optional[Callable[[Optional[torch.Tensor]], None]] = None
    interrupt: Optional[Callable[[], None]] = None

    def check(self) -> None:
        """Call before every model evaluation: raises (via ``interrupt``) when the user cancelled."""
        if self.interrupt is not None:
            self.interrupt()

    def step(self, x0: Optional[torch.Tensor] = None) -> None:
        """Call after every finished step with the predicted clean latent ``[1, 4, F, h, w]`` (or None)."""
        if self.progress is not None:
            self.progress(x0)


NO_CALLBACKS = Callbacks()
