"""Module swapping: replace every quantizable ``nn.Conv2d`` / ``nn.Linear`` by its quantized twin,
as a ``QConfig`` says. No tracing: the model keeps its class, its forward code and its hooks."""
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from .nn import QUANT_LAYERS, QConv2d, QConvTranspose2d, QLinear, stream_quantizers
from .observers import build_observer
from .qconfig import LayerQConfig, QConfig
from .quantizers import QScheme, UniformQuantizer, build_quantizer

# Subclasses whose forward is the plain convolution / linear map (the mmcv wrappers only add
# empty-tensor handling), so swapping them loses nothing. Named, not imported: no mmcv needed.
_PLAIN_SUBCLASSES = {'mmcv.cnn.bricks.wrappers.Conv2d', 'mmcv.cnn.bricks.wrappers.ConvTranspose2d',
                     'mmcv.cnn.bricks.wrappers.Linear',
                     # weight-standardised conv: the twin standardises before quantizing
                     # (QConv2d.weight_standardization), PTQ bakes it first (mmquant.nn.weight_std)
                     'mmcv.cnn.bricks.conv_ws.ConvWS2d'}
_TWINS = ((nn.Conv2d, QConv2d, 'conv'), (nn.ConvTranspose2d, QConvTranspose2d, 'deconv'),
          (nn.Linear, QLinear, 'linear'))


def _qualname(m: nn.Module) -> str:
    return f'{type(m).__module__}.{type(m).__qualname__}'


def classify_layer(m: nn.Module) -> Tuple[Optional[type], Optional[str]]:
    """``(twin class, None)`` for a layer we can swap, ``(None, reason)`` for a conv / linear we
    must leave float, ``(None, None)`` for everything else."""
    if isinstance(m, QUANT_LAYERS):
        return None, 'already quantized'
    for base, twin, _ in _TWINS:
        if isinstance(m, base):
            if type(m) is base or _qualname(m) in _PLAIN_SUBCLASSES:
                if getattr(m, 'padding_mode', 'zeros') != 'zeros':
                    return None, f'padding_mode={m.padding_mode!r} (only zero padding is quantized)'
                return twin, None
            return None, f'{_qualname(m)} changes the {base.__name__} forward; not swapped'
    if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d)):
        return None, f'{type(m).__name__} has no quantized twin yet'
    return None, None


@dataclass
class LayerRecord:
    name: str
    type: str
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    role: str = ''
    reason: str = ''


@dataclass
class ConversionReport:
    quantized: List[LayerRecord] = field(default_factory=list)
    kept_float: List[LayerRecord] = field(default_factory=list)
    first_layers: List[str] = field(default_factory=list)
    last_layers: List[str] = field(default_factory=list)
    fused: List[Tuple[str, str]] = field(default_factory=list)     # (conv, BatchNorm) folded while training

    def format(self) -> str:
        lines = [f'mmquant: {len(self.quantized)} layers quantized, {len(self.kept_float)} kept float']
        if self.fused:
            lines[0] += f'; {len(self.fused)} convs fold their BatchNorm'
        for r in self.quantized:
            a = 'float' if r.a_bits is None else f'a{r.a_bits}'
            lines.append(f'  q  {r.name:<60s} {r.type:<8s} w{r.w_bits} {a:<5s} {r.role}')
        for r in self.kept_float:
            lines.append(f'  fp {r.name:<60s} {r.type:<8s} {r.reason}')
        return '\n'.join(lines)


def upstream_layers(model: nn.Module, names: List[str],
                    example_forward: Callable[[], object]) -> Dict[str, List[str]]:
    """For each of ``names`` that one run of ``example_forward`` calls, the layers among ``names``
    whose outputs its input reaches first, following the autograd graph from the layer's input
    back to the nearest layer outputs (an empty list: nothing of ``names`` upstream). Exact through
    any functional code (residual adds, concatenation, RoI ops); a layer called several times
    (heads shared across FPN levels) collects the producers of every call. Nothing is updated
    (evaluation mode; frozen parameters are unfrozen for the run so that the graph is whole)."""
    modules = dict(model.named_modules())
    out_node: Dict[object, str] = {}
    in_nodes: Dict[str, list] = {n: [] for n in names}
    handles = []

    def hook(name):
        def fn(mod, inputs, output):
            x = inputs[0] if inputs else None
            in_nodes[name].append(getattr(x, 'grad_fn', None))
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                out_node[output.grad_fn] = name
        return fn

    for n in names:
        handles.append(modules[n].register_forward_hook(hook(n)))
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]   # frozen stages cut the graph
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            example_forward()
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)

    upstream = {}
    for name, nodes in in_nodes.items():
        if not nodes:
            continue
        found = upstream[name] = []
        for start in nodes:
            stack, seen = [start] if start is not None else [], set()
            while stack:
                node = stack.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                if node in out_node:
                    if out_node[node] not in found:
                        found.append(out_node[node])
                    continue
                stack.extend(nxt for nxt, _ in node.next_functions)
    return upstream


def find_io_layers(model: nn.Module, names: List[str],
                   example_forward: Callable[[], object]) -> Tuple[Set[str], Set[str]]:
    """Find the input layers (no quantizable layer upstream) and the output layers (no quantizable
    layer downstream) among ``names`` by one forward pass (:func:`upstream_layers`)."""
    upstream = upstream_layers(model, names, example_forward)
    feeds = {p for producers in upstream.values() for p in producers}
    first = {n for n, producers in upstream.items() if not producers}
    last = set(upstream) - feeds
    return first, last


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def _check_patterns(patterns, names, what):
    for p in patterns:
        if not any(_matches(n, p) for n in names):
            raise ValueError(f'{what} pattern {p!r} matches no quantizable layer; layer names look '
                             f'like {names[0]!r} ... {names[-1]!r}' if names else
                             f'{what} pattern {p!r} matches no quantizable layer (the model has none)')


def layer_qconfig(name: str, qconfig: QConfig, first: Set[str], last: Set[str]):
    """The resolved settings of one layer and its role (``first`` / ``last`` / '')."""
    cfg: LayerQConfig = qconfig.default
    role = ''
    for layers, bits, tag in ((first, qconfig.first_layer_bits, 'first'),
                              (last, qconfig.last_layer_bits, 'last')):
        if name in layers:
            role = tag if not role else f'{role}+{tag}'
            if bits is not None or qconfig.io_layer:
                changes = dict(qconfig.io_layer)
                if bits is not None:
                    changes.update(w_bits=bits, a_bits=None if cfg.a_bits is None else bits)
                cfg = replace(cfg, **changes)
    for pattern, ov in qconfig.overrides.items():
        if _matches(name, pattern):
            cfg = replace(cfg, **ov)
            role = f'{role} override:{pattern}'.strip()
    return cfg, role


def build_quantizers(layer: nn.Module, cfg: LayerQConfig):
    # output channels: axis 0 of conv / linear weights, axis 1 of transposed-conv weights
    # (per-channel only without groups there; grouped transposed convs get one scale)
    transposed = isinstance(layer, nn.ConvTranspose2d)
    per_channel = cfg.w_per_channel and not (transposed and layer.groups > 1)
    axis = 1 if transposed else 0
    if cfg.w_quantizer == 'uniform':
        w_scheme = QScheme(bits=cfg.w_bits, symmetric=cfg.w_symmetric, signed=True,
                           narrow_range=cfg.w_narrow_range, per_channel=per_channel, ch_axis=axis)
        wq = UniformQuantizer(w_scheme, num_channels=layer.weight.shape[axis],
                              observer=build_observer(cfg.w_observer, per_channel, axis,
                                                      **cfg.w_observer_kwargs))
    else:
        wq = build_quantizer(cfg.w_quantizer, 'weight', cfg.w_bits, num_channels=layer.weight.shape[axis],
                             ch_axis=axis, per_channel=per_channel, **cfg.w_quantizer_kwargs)
    aq = None
    if cfg.a_bits is not None and cfg.a_quantizer == 'uniform':
        a_scheme = QScheme(bits=cfg.a_bits, symmetric=cfg.a_symmetric, signed=cfg.a_signed)
        aq = UniformQuantizer(a_scheme, observer=build_observer(cfg.a_observer, **cfg.a_observer_kwargs))
    elif cfg.a_bits is not None:
        aq = build_quantizer(cfg.a_quantizer, 'act', cfg.a_bits, signed=cfg.a_signed, **cfg.a_quantizer_kwargs)
    return wq, aq


def _set_layer_options(name: str, q: nn.Module, cfg: LayerQConfig):
    if cfg.w_standardize and q.weight_standardization is None:
        q.weight_standardization = 1e-5
    if not cfg.padding_after_quant and isinstance(q, QConv2d):
        if isinstance(q.padding, str):
            raise ValueError(f'{name}: padding_after_quant=False needs numeric padding, got '
                             f'padding={q.padding!r}')
        q.padding_after_quant = False


def convert(model: nn.Module, qconfig: QConfig,
            example_forward: Optional[Callable[[], object]] = None,
            io_layers: Optional[Tuple[Set[str], Set[str]]] = None) -> ConversionReport:
    """Swap the model's layers in place and return what was done.

    The input and output layers (for ``first/last_layer_bits``) are, in order of preference:
    ``io_layers`` given as ``(first names, last names)`` (e.g. read back from a checkpoint);
    found by :func:`find_io_layers` through ``example_forward`` (a no-argument callable running
    the model on one real batch); else the first and last quantizable layers in registration
    order (right for classifiers, not for detectors with several heads).
    """
    report = ConversionReport()
    candidates, unsupported = [], []
    for name, m in model.named_modules():
        twin, reason = classify_layer(m)
        if twin is not None:
            candidates.append(name)
        elif reason is not None and reason != 'already quantized':
            unsupported.append((name, m, reason))
    names = candidates
    _check_patterns(list(qconfig.overrides), names, 'override')
    _check_patterns(qconfig.skip, names, 'skip')
    _check_patterns(qconfig.only, names, 'only')

    if not names:
        report.kept_float = [LayerRecord(n, type(m).__name__, reason=r) for n, m, r in unsupported]
        return report
    if io_layers is not None:
        first, last = (set(s) for s in io_layers)
        _check_patterns(sorted(first | last), names, 'first/last layer')
    elif example_forward is not None:
        first, last = find_io_layers(model, names, example_forward)
    else:
        first, last = {names[0]}, {names[-1]}

    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        kind = next(k for base, _, k in _TWINS if isinstance(m, base))
        skip = next((p for p in qconfig.skip if _matches(name, p)), None)
        if skip is not None:
            report.kept_float.append(LayerRecord(name, kind, reason=f'skip pattern {skip!r}'))
            continue
        if qconfig.only and not any(_matches(name, p) for p in qconfig.only):
            report.kept_float.append(LayerRecord(name, kind, reason='outside the only patterns'))
            continue
        cfg, role = layer_qconfig(name, qconfig, first, last)
        twin, _ = classify_layer(m)
        wq, aq = build_quantizers(m, cfg)
        device = m.weight.device               # a model converted after it moved to a GPU
        wq, aq = wq.to(device), None if aq is None else aq.to(device)
        q = twin.from_float(m, wq, aq)
        _set_layer_options(name, q, cfg)
        parent_name, _, child = name.rpartition('.')
        setattr(modules[parent_name] if parent_name else model, child, q)
        report.quantized.append(LayerRecord(name, kind, cfg.w_bits, cfg.a_bits, role))
    report.kept_float += [LayerRecord(n, type(m).__name__, reason=r) for n, m, r in unsupported]
    report.first_layers, report.last_layers = sorted(first), sorted(last)
    return report


def quant_layers(model: nn.Module):
    """``(name, layer)`` of every quantized twin in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def activation_quantizers(model: nn.Module):
    """``(name, quantizer)`` of every activation quantizer: the twins' input quantizers and the
    quantized residual streams' (:func:`mmquant.nn.quantize_residuals`)."""
    return [(f'{n}.input_quantizer', m.input_quantizer) for n, m in quant_layers(model)
            if m.input_quantizer is not None] + stream_quantizers(model)


def all_quantizers(model: nn.Module):
    """Every weight and activation quantizer in the model."""
    return [m.weight_quantizer for _, m in quant_layers(model)] + [q for _, q in activation_quantizers(model)]


def weight_bytes(model: nn.Module) -> float:
    """Bytes of the quantized layers' weights at their bit widths (the model's size on an integer
    target, biases and float layers aside)."""
    return sum(m.weight.numel() * m.weight_quantizer.bits for _, m in quant_layers(model)) / 8
