"""Inputs and outputs of one module over the calibration batches, torch only.

Block reconstruction trains a unit on (input, float output) pairs. :func:`capture` runs the
batches with hooks on the unit and keeps what it received and returned, call by call: a module
called several times per forward (a detection head shared by the FPN levels) gives one stream
per call index, and inputs of different shapes (canvases of different sizes) are kept apart.
The forward stops once the unit has made its last call of the batch, so capturing a unit near
the input costs a fraction of a forward pass.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ['Stream', 'capture', 'capture_grads', 'count_calls']


class _Stop(Exception):
    pass


@dataclass
class Stream:
    """The ``k``-th call of the unit in every batch, all of one input shape: ``inputs`` and
    ``outputs`` concatenated over the batches (first axis: samples)."""
    call: int
    inputs: torch.Tensor
    outputs: Optional[torch.Tensor] = None
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self):
        return self.inputs.shape[0]


def _first_tensor(args, where: str) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor) or any(isinstance(a, torch.Tensor) for a in args[1:]):
        raise TypeError(f'{where}: reconstruction needs a unit that takes one tensor; name another module '
                        f'as the block')
    return args[0]


def count_calls(model: nn.Module, modules: Dict[str, nn.Module], batches: Sequence, fwd: Callable):
    """One forward pass per batch (no grad): ``(calls, order)`` with ``calls[name]`` the number of
    calls of each module per batch and ``order`` the names by first call (never-called last)."""
    calls = {n: [0] * len(batches) for n in modules}
    first: Dict[str, int] = {}
    b = [0]

    def make(n):
        def hook(m, a):
            first.setdefault(n, len(first))
            calls[n][b[0]] += 1
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                b[0] = i
                fwd(model, batch)
    finally:
        for h in handles:
            h.remove()
    order = sorted(modules, key=lambda n: first.get(n, len(modules)))
    return calls, order


def capture(model: nn.Module, module: nn.Module, batches: Sequence, fwd: Callable,
            calls: Union[int, Sequence[int]], outputs: bool = True, name: str = 'unit') -> List[Stream]:
    """Run ``fwd(model, batch)`` on every batch (no grad) and keep ``module``'s input (and output)
    of each call; the forward stops after the ``calls``-th call of each batch (one number for
    all batches or one per batch, from :func:`count_calls`). Returns one :class:`Stream` per
    (call index, input shape)."""
    per_batch = [calls] * len(batches) if isinstance(calls, int) else list(calls)
    limit = [0]
    chunks: Dict[Tuple[int, Tuple[int, ...]], List[Tuple[torch.Tensor, Optional[torch.Tensor]]]] = {}
    k = [0]
    pending: List[Optional[torch.Tensor]] = [None]

    def pre(m, args):
        pending[0] = _first_tensor(args, name).detach()
        if not outputs:
            _keep(None)

    def post(m, args, out):
        if outputs:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f'{name}: reconstruction needs a unit that returns one tensor')
            _keep(out.detach())

    def _keep(out):
        x = pending[0]
        chunks.setdefault((k[0], tuple(x.shape[1:])), []).append((x, out))
        k[0] += 1
        if k[0] >= limit[0]:
            raise _Stop

    h1 = module.register_forward_pre_hook(pre)
    h2 = module.register_forward_hook(post)
    try:
        with torch.no_grad():
            for batch, n in zip(batches, per_batch):
                k[0], limit[0] = 0, n
                if n == 0:
                    continue
                try:
                    fwd(model, batch)
                except _Stop:
                    pass
    finally:
        h1.remove()
        h2.remove()
    streams = []
    for (call, _), items in sorted(chunks.items(), key=lambda kv: kv[0][0]):
        xs = torch.cat([x for x, _ in items])
        ys = torch.cat([y for _, y in items]) if outputs else None
        streams.append(Stream(call, xs, ys))
    return streams


def capture_grads(model: nn.Module, module: nn.Module, batches: Sequence, loss_fn: Callable,
                  name: str = 'unit') -> Dict[Tuple[int, Tuple[int, ...]], torch.Tensor]:
    """Gradients of the task loss ``loss_fn(model, batch)`` with respect to each output of
    ``module``, keyed like the streams of :func:`capture` (call index, input shape) and
    concatenated over the batches in the same order. One forward and backward pass per batch;
    the model's parameters get no gradients."""
    grads: Dict[Tuple[int, Tuple[int, ...]], List[torch.Tensor]] = {}
    k = [0]
    shape = [None]

    def pre(m, args):
        shape[0] = tuple(_first_tensor(args, name).shape[1:])

    def post(m, args, out):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f'{name}: reconstruction needs a unit that returns one tensor')
        key = (k[0], shape[0])
        k[0] += 1
        slot = grads.setdefault(key, [])
        idx = len(slot)
        slot.append(torch.zeros_like(out))

        def store(g):
            slot[idx] = g.detach()
        if out.requires_grad:
            out.register_hook(store)

    params = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    anchor = torch.zeros((), requires_grad=True)

    def track(m, args, out):      # the outputs join the graph even when nothing before them learns
        if isinstance(out, torch.Tensor) and not out.requires_grad:
            return out + anchor.to(out.dtype)     # not a leaf: in-place ops after it stay legal

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(track),
               module.register_forward_hook(post)]
    try:
        with torch.enable_grad():
            for batch in batches:
                k[0] = 0
                loss_fn(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in params:
            p.requires_grad_(flag)
    return {key: torch.cat(v) for key, v in grads.items()}
