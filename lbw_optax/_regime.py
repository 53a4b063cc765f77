"""Training regimes that a governance policy can name."""

import enum


class Regime(enum.IntEnum):
    """What a policy believes the run is doing at a step.

    Stored in optimizer state as an ``int32`` scalar; compare with ``Regime.SPIKE`` etc.

    - ``STABLE``: signals within their normal range; the update goes through at full scale.
    - ``STRESSED``: a sustained bad trend (loss rising, or gradient mean-square above its
      average); the policy dampens.
    - ``SPIKE``: a sudden outlier in the loss or the gradients; the policy cuts the scale and
      may hold the step.
    - ``OSCILLATION``: signs of overshooting (gradient norm growing, or the mean gradient
      flipping sign); the policy dampens gently.
    - ``RECOVERY``: stress has passed; the scale is released back towards its maximum.
    - ``NONFINITE``: the loss or a gradient was NaN/Inf; the step is always held.
    """

    STABLE = 0
    STRESSED = 1
    SPIKE = 2
    OSCILLATION = 3
    RECOVERY = 4
    NONFINITE = 5
