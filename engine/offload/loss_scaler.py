"""Dynamic loss scaling for fp16 (the same policy as DeepSpeed's): on overflow the step
is skipped and, once ``hysteresis`` overflows have been tolerated, the scale halves; after
``window`` steps without overflow it doubles."""
from __future__ import annotations


class DynamicLossScaler:
    def __init__(self, initial_scale: float = 2.0**16, window: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0, dynamic: bool = True):
        self.scale = float(initial_scale)
        self.window, self.hysteresis, self.min_scale, self.dynamic = window, hysteresis, min_scale, dynamic
        self._hysteresis_left = hysteresis
        self._good_steps = 0
        self.overflows = 0

    def update(self, overflow: bool) -> None:
        """Records the outcome of one optimizer step."""
        if not self.dynamic:
            return
        if overflow:
            self.overflows += 1
            self._good_steps = 0
            if self._hysteresis_left <= 1:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self._hysteresis_left = self.hysteresis
            else:
                self._hysteresis_left -= 1
            return
        self._good_steps += 1
        if self._good_steps % self.window == 0:
            self.scale *= 2.0
            self._hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return dict(scale=self.scale, hysteresis_left=self._hysteresis_left, good_steps=self._good_steps,
                    overflows=self.overflows)

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._hysteresis_left = int(state["hysteresis_left"])
        self._good_steps = int(state["good_steps"])
        self.overflows = int(state["overflows"])
