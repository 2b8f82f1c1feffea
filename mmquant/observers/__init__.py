"""Range estimators for calibration: min-max, percentile, MSE (Lp search), KL (entropy), ACIQ
(analytical clip of a Laplace / Gauss fit)."""
from .aciq import ACIQObserver
from .base import Observer
from .kl import KLObserver
from .minmax import MinMaxObserver
from .mse import MSEObserver
from .percentile import PercentileObserver

OBSERVERS = {cls.name: cls for cls in (MinMaxObserver, PercentileObserver, MSEObserver, KLObserver, ACIQObserver)}


def build_observer(name: str, per_channel: bool = False, ch_axis: int = 0, **kwargs) -> Observer:
    """Build an observer by name, with one clear error for an unknown name."""
    if name not in OBSERVERS:
        raise ValueError(f'unknown observer {name!r}; accepted: {", ".join(sorted(OBSERVERS))}')
    return OBSERVERS[name](per_channel=per_channel, ch_axis=ch_axis, **kwargs)


__all__ = ['Observer', 'MinMaxObserver', 'PercentileObserver', 'MSEObserver', 'KLObserver', 'ACIQObserver',
           'OBSERVERS', 'build_observer']
