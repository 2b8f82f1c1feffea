"""Block rewrites for binary networks (torch only; the blocks are recognised by their parts).

A sign needs signed inputs, and the stock ResNet basic block feeds each conv a ReLU output
(all ``+1`` after a sign). The binary methods therefore rewrite every basic block, keeping its
convs, norms and downsample under the same names (a float checkpoint loads unchanged):

* ``plain`` (XNOR-Net, XNOR-Net++): ``norm2(conv2(norm1(conv1(x)))) + shortcut(x)``, no ReLU;
* ``bireal`` (Bi-Real Net): a real-valued shortcut around every conv,
  ``y = norm1(conv1(x)) + shortcut(x)``, ``out = norm2(conv2(y)) + y``;
* ``groupnet`` (Group-Net): ``sum_k lambda_k B_k(x)`` over ``K`` binary copies ``B_k`` of the
  plain block with learned scales ``lambda_k``.

and the backbone's stem ReLU (between the first conv and the first block) becomes an identity,
as in Bi-Real Net. The shortcut's downsample conv stays a real-valued (8-bit) path.
"""
import copy
from typing import List

import torch
from torch import nn

from .norm_names import TwoNorms

STYLES = ('plain', 'bireal', 'groupnet')


def is_basic_block(m: nn.Module) -> bool:
    """An mmpretrain / mmdet / torchvision-style ResNet basic block (two 3x3 convs) in the
    standard conv-BN-ReLU order: the rewrites that rebuild a block's forward from its parts
    assume it, so a block declaring another ``order`` (mmquant's ``OrderedResNet``) is not one."""
    return (all(hasattr(m, k) for k in ('conv1', 'conv2', 'downsample')) and not hasattr(m, 'conv3')
            and isinstance(m.conv1, nn.Conv2d) and isinstance(m.conv2, nn.Conv2d)
            and getattr(m, 'order', 'cbsa') == 'cbsa')


def _reordered_blocks(model: nn.Module) -> List[str]:
    """The layer orders of blocks that have a basic block's parts in another order."""
    return sorted({m.order for m in model.modules() if isinstance(getattr(m, 'order', None), str)
                   and hasattr(m, 'conv1') and hasattr(m, 'conv2') and not is_basic_block(m)})


def is_bottleneck(m: nn.Module) -> bool:
    return all(hasattr(m, k) for k in ('conv1', 'conv2', 'conv3', 'downsample'))


def _norm_names(block: nn.Module):
    names = [getattr(block, 'norm1_name', 'bn1'), getattr(block, 'norm2_name', 'bn2')]
    for n in names:
        if not isinstance(getattr(block, n, None), nn.Module):
            raise ValueError(f'basic block {type(block).__name__} has no norm layer {n!r}')
    return names


class BinaryBasicBlock(TwoNorms, nn.Module):
    """A basic block rewired for binary convs (``style`` 'plain' or 'bireal')."""

    def __init__(self, block: nn.Module, style: str = 'plain'):
        super().__init__()
        if style not in ('plain', 'bireal'):
            raise ValueError(f"style={style!r}; accepted: 'plain', 'bireal'")
        self.style = style
        self.norm1_name, self.norm2_name = _norm_names(block)
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.add_module(self.norm1_name, getattr(block, self.norm1_name))
        self.add_module(self.norm2_name, getattr(block, self.norm2_name))
        self.downsample = block.downsample

    def shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x):
        y = self.norm1(self.conv1(x))
        if self.style == 'bireal':
            y = y + self.shortcut(x)
            return self.norm2(self.conv2(y)) + y
        return self.norm2(self.conv2(y)) + self.shortcut(x)


class GroupNetBlock(nn.Module):
    """``sum_k lambda_k B_k(x)``: ``K`` binary plain blocks with learned scales (``lambdas``,
    initialised to ``1/K``).

    A float checkpoint of the original block loads into every branch; branch ``k > 0`` gets its
    conv weights perturbed by ``noise * std(w)`` (fixed seed ``k``), since identical branches
    receive identical updates and would stay one branch forever.
    """

    def __init__(self, block: nn.Module, branches: int = 5, noise: float = 0.05):
        super().__init__()
        if branches < 1:
            raise ValueError(f'branches={branches} must be >= 1')
        self.noise = noise
        self.branches = nn.ModuleList([BinaryBasicBlock(copy.deepcopy(block), 'plain')
                                       for _ in range(branches)])
        self.lambdas = nn.Parameter(torch.full((branches, ), 1.0 / branches))
        self._register_load_state_dict_pre_hook(self._from_float_block)

    def forward(self, x):
        out = 0
        for lam, branch in zip(self.lambdas, self.branches):
            out = out + lam * branch(x)
        return out

    def _from_float_block(self, state_dict, prefix, *args):
        """Keys of the original block (``prefix.conv1.weight``...) fill every branch."""
        plain = [k for k in list(state_dict) if k.startswith(prefix) and not k.startswith(prefix + 'branches.')
                 and k != prefix + 'lambdas']
        if not plain or any(k.startswith(prefix + 'branches.') for k in state_dict):
            return
        for key in plain:
            value = state_dict.pop(key)
            rest = key[len(prefix):]
            for i in range(len(self.branches)):
                v = value
                if i > 0 and self.noise > 0 and rest.endswith('weight') and value.dim() == 4:
                    g = torch.Generator().manual_seed(i)
                    v = value + self.noise * value.float().std() * torch.randn(value.shape, generator=g).to(value)
                state_dict[f'{prefix}branches.{i}.{rest}'] = v


def _stem_relu_off(model: nn.Module, block_names: List[str]) -> List[str]:
    """Replace the ``relu`` attribute of each module that owns the rewritten blocks' stages (the
    ResNet backbone's stem activation) by an identity."""
    done = []
    owners = {n.rsplit('.', 2)[0] if n.count('.') >= 2 else '' for n in block_names}
    modules = dict(model.named_modules())
    for owner in sorted(owners):
        m = modules.get(owner)
        if m is not None and isinstance(getattr(m, 'relu', None), nn.ReLU):
            m.relu = nn.Identity()
            done.append(f'{owner}.relu' if owner else 'relu')
    return done


def rewrite_binary_blocks(model: nn.Module, style: str = 'bireal', branches: int = 5) -> List[str]:
    """Rewrite every basic block of ``model`` in place for ``style`` (see the module doc);
    return the names of the rewritten blocks. A model without basic blocks (VGG, or a
    ResNet-50 of bottlenecks) is an error: the binary methods are defined on basic blocks."""
    if style not in STYLES:
        raise ValueError(f'unknown binary block style {style!r}; accepted: {", ".join(STYLES)}')
    names = [n for n, m in model.named_modules() if n and is_basic_block(m)]
    if not names:
        reordered = _reordered_blocks(model)
        kinds = (f'basic blocks in layer order {", ".join(map(repr, reordered))} (OrderedResNet), which '
                 f'the rewrite does not reorder' if reordered else
                 'bottleneck blocks (ResNet-50 style)' if any(is_bottleneck(m) for m in model.modules())
                 else 'no residual blocks')
        raise ValueError(f'binary block rewrite ({style}) needs ResNet basic blocks (ResNet-18/34); '
                         f'this model has {kinds}')
    modules = dict(model.named_modules())
    for name in names:
        block = modules[name]
        new = GroupNetBlock(block, branches) if style == 'groupnet' else BinaryBasicBlock(block, style)
        parent, _, child = name.rpartition('.')
        setattr(modules[parent] if parent else model, child, new)
    _stem_relu_off(model, names)
    return names
