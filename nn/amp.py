"""Dynamic loss scaling for fp16 training.

fp16 has a small range: gradients below about 6e-8 flush to zero. Multiplying the loss by a
large `scale` before backward multiplies every gradient by the same factor (the chain rule is
linear), lifting small gradients into range; the optimizer divides by `scale` again, in float32,
before using them (`AdamW.step(lr, inv_scale=scaler.inv_scale)`).

Too large a scale overflows to inf instead. Nobody knows the right scale in advance, so it is
searched for while training: on an overflow the step is skipped and the scale halved; after
`growth_interval` clean steps in a row it is doubled to probe for more headroom. A skipped step
costs one batch, which is cheap when overflows are rare (one per `growth_interval` steps at most
once the scale has settled).

    (loss * scaler.scale).backward()      # loss in float32: fp16 cannot even hold 2^16
    result = opt.step(lr, inv_scale=scaler.inv_scale, clip_norm=1.0)
    scaler.update(result.found_inf)
"""
import math

from .arguments import integer_at_least


class LossScaler:
    """The scale to multiply the loss by, adapted to overflows (GradScaler's rule, with a floor
    and a ceiling). With enabled=False (float32 training) the scale is always 1.0, and
    `update` only counts skipped steps."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, min_scale=1.0, max_scale=2.0 ** 24, enabled=True):
        self._configure(init_scale, growth_factor, backoff_factor, growth_interval,
                        min_scale, max_scale, enabled)
        self._scale = self.init_scale
        self.clean_steps = 0    # consecutive steps without overflow since the scale last changed
        self.skipped_steps = 0  # total steps skipped for inf/NaN gradients, for logging

    def _configure(self, init_scale, growth_factor, backoff_factor, growth_interval,
                   min_scale, max_scale, enabled):
        init_scale, min_scale, max_scale = float(init_scale), float(min_scale), float(max_scale)
        growth_factor, backoff_factor = float(growth_factor), float(backoff_factor)
        if not all(map(math.isfinite, (init_scale, min_scale, max_scale, growth_factor, backoff_factor))):
            raise ValueError("loss-scaler settings must be finite numbers")
        if not growth_factor > 1:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        growth_interval = integer_at_least("growth_interval", growth_interval, 1)
        if not 0 < min_scale <= init_scale <= max_scale:
            raise ValueError("need 0 < min_scale <= init_scale <= max_scale, got "
                             f"min_scale={min_scale:g}, init_scale={init_scale:g}, max_scale={max_scale:g}")
        self.init_scale, self.min_scale, self.max_scale = init_scale, min_scale, max_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.enabled = bool(enabled)

    @property
    def scale(self):
        """The factor to multiply the loss by (1.0 when disabled)."""
        return self._scale if self.enabled else 1.0

    @property
    def inv_scale(self):
        """What the optimizer multiplies the gradients by to undo the scaling."""
        return 1.0 / self.scale

    def update(self, found_inf):
        """Adapt the scale after one optimizer step; `found_inf` is what `AdamW.step` reported."""
        if found_inf:
            self.skipped_steps += 1
            self.clean_steps = 0
            # The floor keeps a run of NaNs from an actual bug (not an overflow) from driving the
            # scale to zero, where every gradient would unscale to inf*0 = NaN.
            self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self._scale = min(self._scale * self.growth_factor, self.max_scale)
            self.clean_steps = 0

    def state_dict(self):
        return {"scale": self._scale, "init_scale": self.init_scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "min_scale": self.min_scale, "max_scale": self.max_scale, "enabled": self.enabled,
                "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state):
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise KeyError(f"loss-scaler state is missing {', '.join(missing)}")
        scale = float(state["scale"])
        if not float(state["min_scale"]) <= scale <= float(state["max_scale"]):
            raise ValueError(f"loss-scaler state has scale {scale:g} outside its own "
                             f"[min_scale, max_scale] = [{state['min_scale']:g}, {state['max_scale']:g}]")
        self._configure(state["init_scale"], state["growth_factor"], state["backoff_factor"],
                        state["growth_interval"], state["min_scale"], state["max_scale"], state["enabled"])
        self._scale = scale
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        return self

    def __repr__(self):
        return (f"LossScaler(scale={self.scale:g}, clean_steps={self.clean_steps}, "
                f"skipped_steps={self.skipped_steps}, enabled={self.enabled})")
