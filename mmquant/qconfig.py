"""The declarative description of what to quantize and how (no mmengine, no torch modules)."""
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Dict, List, Optional, Tuple

from .observers import OBSERVERS
from .quantizers.registry import check_quantizer_bits
from .quantizers.scheme import MAX_BITS, check_bits

_BITS_RE = re.compile(r'^w(\d+)(?:a(\d+))?$')


def parse_bits(spec: str, binary: bool = False) -> Tuple[int, Optional[int]]:
    """``'w4a8'`` -> ``(4, 8)``; ``'w3'`` (weight-only) -> ``(3, None)``. ``binary=True`` also
    accepts 1 bit (for the training methods that have binary quantizers).

    >>> parse_bits('w4a8'), parse_bits('W3'), parse_bits('w1a1', binary=True)
    ((4, 8), (3, None), (1, 1))
    """
    m = _BITS_RE.match(str(spec).strip().lower())
    lo = 1 if binary else 2
    if not m:
        raise ValueError(f'bad bit spec {spec!r}: expected wNaM (e.g. w4a8) or wN for weight-only '
                         f'(e.g. w3), with N, M in {lo}..{MAX_BITS}')

    def check(b, what):
        if binary and b == 1:
            return b
        return check_bits(b, what)
    w = check(int(m.group(1)), f'weight bits in {spec!r}')
    a = None if m.group(2) is None else check(int(m.group(2)), f'activation bits in {spec!r}')
    return w, a


@dataclass
class LayerQConfig:
    """The settings that can differ from layer to layer."""
    w_bits: int = 8
    a_bits: Optional[int] = 8            # None: weight-only
    w_observer: str = 'minmax'
    a_observer: str = 'minmax'
    w_per_channel: bool = False
    w_symmetric: bool = True
    w_narrow_range: bool = False
    a_symmetric: bool = False
    a_signed: Optional[bool] = None      # None: decided by calibration (unsigned after ReLU)
    w_observer_kwargs: dict = field(default_factory=dict)
    a_observer_kwargs: dict = field(default_factory=dict)
    # 'uniform' (observer-calibrated grid), 'fixed' (F8Net's fixed point, 2..8 bits) or a trained
    # quantizer: lsq, pact, dorefa, sat, lqnet, xnor, xnorpp, bireal (weights), sign (activations);
    # the kwargs go to its constructor
    w_quantizer: str = 'uniform'
    a_quantizer: str = 'uniform'
    w_quantizer_kwargs: dict = field(default_factory=dict)
    a_quantizer_kwargs: dict = field(default_factory=dict)
    # weight standardisation (per output channel, eps 1e-5 as mmcv's ConvWS) before the weight
    # quantizer; for training: it changes a trained float model's function (an mmcv ConvWS2d layer
    # keeps its own standardisation without this flag)
    w_standardize: bool = False
    # convs: zero-pad the quantized input (True) or pad the float input, then quantize (False)
    padding_after_quant: bool = True

    def __post_init__(self):
        check_quantizer_bits(self.w_quantizer, 'weight', self.w_bits, 'w_bits')
        if self.a_bits is not None:
            check_quantizer_bits(self.a_quantizer, 'act', self.a_bits, 'a_bits')
        for key in ('w_observer', 'a_observer'):
            if getattr(self, key) not in OBSERVERS:
                raise ValueError(f'unknown {key} {getattr(self, key)!r}; accepted: '
                                 f'{", ".join(sorted(OBSERVERS))}')


_LAYER_KEYS = {f.name for f in fields(LayerQConfig)}


@dataclass
class QConfig:
    """What the converter does to a model.

    Args:
        default: settings for every quantizable layer (a :class:`LayerQConfig` or a dict of it).
        first_layer_bits / last_layer_bits: weight and activation bits of the input layer(s) and
            output layer(s) (the papers keep them at 8); ``None`` treats them like the rest.
        overrides: ``{glob pattern on the module name: dict of LayerQConfig fields}``, applied
            in order after the first/last rule, so a user can always have the last word.
        skip: glob patterns of layers to leave in float.
        only: glob patterns of the layers to quantize, the rest left in float (empty: all), e.g.
            ``['backbone.*']`` quantizes a detector's backbone only (QTool's detection switch);
            ``skip`` still applies inside it.
        io_layer: further :class:`LayerQConfig` fields for the first / last layers (e.g. the
            binary methods give them a uniform 8-bit quantizer, since a sign has no 8-bit form).

    A pattern that matches no quantizable layer is an error naming the pattern.
    """
    default: LayerQConfig = field(default_factory=LayerQConfig)
    first_layer_bits: Optional[int] = 8
    last_layer_bits: Optional[int] = 8
    overrides: Dict[str, dict] = field(default_factory=dict)
    skip: List[str] = field(default_factory=list)
    only: List[str] = field(default_factory=list)
    io_layer: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.default, dict):
            self.default = LayerQConfig(**self.default)
        unknown = set(self.io_layer) - _LAYER_KEYS
        if unknown:
            raise ValueError(f'io_layer has unknown keys {sorted(unknown)}; accepted: {sorted(_LAYER_KEYS)}')
        for b, name in ((self.first_layer_bits, 'first_layer_bits'), (self.last_layer_bits, 'last_layer_bits')):
            if b is not None:
                check_bits(b, name)
        for pattern, ov in self.overrides.items():
            unknown = set(ov) - _LAYER_KEYS
            if unknown:
                raise ValueError(f'override {pattern!r} has unknown keys {sorted(unknown)}; '
                                 f'accepted: {sorted(_LAYER_KEYS)}')
            replace(self.default, **ov)   # validates the values

    @classmethod
    def build(cls, cfg=None, bits: Optional[str] = None, **kwargs) -> 'QConfig':
        """From a QConfig, a (config) dict, and/or a ``'w4a8'`` spec (which sets default bits)."""
        if isinstance(cfg, QConfig):
            qc = cfg
        else:
            d = dict(cfg or {})
            d.update(kwargs)
            unknown = set(d) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f'unknown qconfig keys {sorted(unknown)}; accepted: '
                                 f'{sorted(f.name for f in fields(cls))}')
            d['default'] = dict(d.get('default') or {})
            qc = cls(**d)
        if bits is not None:
            w, a = parse_bits(bits, binary=True)
            qc = replace(qc, default=replace(qc.default, w_bits=w, a_bits=a))
        return qc

    def to_dict(self) -> dict:
        return asdict(self)

    def bits_tag(self) -> str:
        d = self.default
        return f'w{d.w_bits}' + ('' if d.a_bits is None else f'a{d.a_bits}')
