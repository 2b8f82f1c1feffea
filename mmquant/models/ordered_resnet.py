"""ResNet-18/34 with the basic-block layer orders of the low-bit quantization literature, as an
mmpretrain backbone (``type='OrderedResNet'``; ``custom_imports=dict(imports=['mmquant'])``).

The orders are named as in QTool (the "model-quantization" collection of low-bit papers' code),
one letter per operation of a residual branch: ``c`` conv, ``b`` BatchNorm, ``a`` activation,
``s`` the sum with the shortcut. ``x`` is the block input, ``sc`` the shortcut (identity, or the
downsample when the stride or the width changes), ``act`` the activation (ReLU by default):

``'cbsa'`` -- post-activation, the standard ResNet (He et al., "Deep Residual Learning for Image
    Recognition", CVPR 2016, Fig. 2 and Eq. (1)-(2), BN right after each conv, Sec. 3.4)::

        out = act(bn2(conv2(act(bn1(conv1(x))))) + sc(x))

    It is mmpretrain's ``BasicBlock`` exactly: same names, so an mmpretrain ResNet-18 checkpoint
    loads (``downsample='conv'``; ``'avgpool_conv'`` matches ``ResNet(avg_down=True)``).

``'bacs'`` -- full pre-activation (He et al., "Identity Mappings in Deep Residual Networks",
    ECCV 2016, Fig. 4(e), Eq. (3) ``x_{l+1} = x_l + F(x_l)``)::

        x'  = act(bn1(x))
        out = conv2(act(bn2(conv1(x')))) + sc

    with ``sc = x`` for an identity shortcut and ``sc = downsample(x')`` for a projection: the
    paper's figures draw identity shortcuts only; for projection units we follow the public
    pre-activation code (fb.resnet.torch's ``preresnet.lua`` and tensorpack's ResNet, their
    ``'both_preact'`` units), where BN-ReLU runs before the split and the 1x1 projection reads the
    pre-activated ``x'``. The projection is a bare conv (no BN after it: the next unit's ``bn1``
    normalises the sum). ``bn1`` has the block's input width. As the paper's appendix prescribes,
    the network adds a BN and an activation after the last unit (``final_norm``, ``final_act``,
    applied to the last stage's output before pooling). Unlike the paper's first unit, which
    reuses the stem's BN-ReLU as its pre-activation, every unit here has its own ``bn1`` (the
    stem is mmpretrain's, conv-BN-ReLU-maxpool), so all units have one structure.

``'cabs'`` -- conv, activation, then BN (Group-Net: Zhuang et al., "Structured Binary Neural
    Networks for Accurate Image Classification and Semantic Segmentation", CVPR 2019; the order
    as the authors' released code runs it, conv -> ReLU -> BN -> add; QTool's ``'cabs'``, marked
    "group-net" there)::

        out = bn2(act(conv2(bn1(act(conv1(x)))))) + sc(x)

    with no activation after the sum and ``sc`` = downsample(x) = BN(conv(x)). Group-Net's code
    also puts a shortcut around each conv (Bi-Real style); this is the one-sum-per-block form
    (QTool's ``'cabs'`` with its ``origin`` keyword). The activation here is never in-place: an
    in-place ReLU returns the conv's own output tensor, and the BatchNorm folding pass
    (:mod:`mmquant.fold_bn`) would then take ``bn1`` for the BN of ``conv1``.

Shortcut convs (``downsample``):

* ``'conv'``: a 1x1 conv with the block's stride (He et al. 2016, projection "option B");
* ``'avgpool_conv'``: ``AvgPool2d(stride)`` then a 1x1 conv with stride 1, so the projection
  sees averages of every position rather than one in ``stride**2``: Bi-Real Net's shortcut
  (Liu et al., ECCV 2018, the authors' code) and ResNet-D's (He et al., "Bag of Tricks for Image
  Classification", CVPR 2019, Fig. 2(c)). The pooling uses ``ceil_mode=True,
  count_include_pad=False`` (as mmpretrain's ``avg_down``), so odd sizes (7x7 at a 28x28 input)
  give the same size as the strided 3x3 conv of the branch.

Both are followed by a BN for ``'cbsa'`` / ``'cabs'`` and by nothing for ``'bacs'`` (above).

Keeping the shortcut convs in float: low-bit papers often leave the downsample convs real-valued.
The converter reads only the qconfig, so that is said there, not here::

    quant = dict(qconfig=dict(skip=['*downsample*']))     # == OrderedResNet.DOWNSAMPLE_SKIP

(or ``overrides={'*downsample*': dict(w_bits=8, a_bits=8)}`` for 8 bits).

Rewrites that rebuild a block's forward from its parts in the conv-BN-ReLU order (the binary
methods' block rewrite, ``quant_residual``, F8Net's shared residual clipping) recognise only
``'cbsa'`` blocks (:func:`mmquant.nn.binary_blocks.is_basic_block`). BRECQ reconstructs each
``OrderedBasicBlock`` as one unit, as it does mmpretrain's blocks.

Two further variants, as constructor options of :class:`OrderedResNet`:

``fixup=True`` -- Fixup, residual learning without normalisation (Zhang, Dauphin, Ma, "Fixup
    Initialization: Residual Learning Without Normalization", ICLR 2019, Sec. 3 and Fig. 1).
    Only with ``order='cbsa'``. No norm layer anywhere in the backbone; every basic block is::

        x'  = x + bias1a
        h   = act(conv1(x') + bias1b)
        out = act((conv2(h + bias2a) * scale + bias2b) + sc)

    with ``sc = x`` for an identity shortcut and ``sc = downsample(x')`` (a bare 1x1 conv, or
    ``'avgpool_conv'``'s pooling then the conv, no BN) for a projection; the stem is
    ``act(conv1(x) + bias)`` (then the max-pool of the ``'resnet'`` stem). ``bias*`` are learnable
    scalars initialised to 0 (the stem's lives in a :class:`ScalarBias` module registered as the
    stem's ``norm1``, so mmpretrain's stem freezing keeps working), ``scale`` a learnable scalar
    initialised to 1. :meth:`OrderedResNet.init_weights` applies the paper's rule ("Fixup", Sec. 3):
    the last conv of each branch (``conv2``) is 0, the other branch conv (``conv1``) is He-normal
    (``std = sqrt(2 / fan_in)``) times ``L ** (-1 / (2m - 2)) = L ** -0.5``, with ``L`` the number
    of residual blocks (8 for ResNet-18) and ``m = 2`` convs per branch; the stem and shortcut
    convs are plain He-normal. A fresh network's blocks therefore pass ``act(sc)`` on, the branch
    adding nothing. The paper also zeroes the classifier: that is the head's, so the config says
    it (``configs/resnet18_fashionmnist_fixup.py``, ``head.init_cfg`` Constant 0); the paper's
    scalar bias before the classifier is left to the head's own bias. A Fixup block reports
    ``order == 'fixup'`` (its branch has no BN), so the conv-BN-ReLU rewrites above refuse it
    rather than rebuild it without its biases.

``stem='tresnet'`` -- the TResNet stem (Ridnik et al., "TResNet: High Performance GPU-Dedicated
    Architecture", WACV 2021, Sec. 3.1 "SpaceToDepth stem"): :class:`SpaceToDepth` with block size
    ``b = space_to_depth`` (default 4, as the paper; 2 or 4 suit 28x28 inputs), then one 3x3 conv
    (stride 1, ``stem_channels`` outputs) -> BN -> act, no max-pool: a 28x28 input gives the first
    stage 28/b x 28/b. :class:`SpaceToDepth` is the lossless rearrangement ::

        out[n, c*b*b + i*b + j, h, w] = x[n, c, b*h + i, b*w + j]    (0 <= i, j < b)

    i.e. each ``b x b`` patch goes to ``b*b`` channels, input channel major, then row, then
    column offset: the channel order of ``torch.nn.functional.pixel_unshuffle``, so
    ``pixel_shuffle`` inverts it. (TResNet's code puts the offsets major and the input channel
    minor; the two differ only by a fixed permutation of the stem conv's input channels.) With
    ``fixup=True`` the stem conv is followed by the scalar bias instead of the BN. Works with every
    ``order``.

Converter and exports: both variants keep the names ``conv1`` / ``conv2`` / ``downsample``, so
:mod:`mmquant.convert` swaps every ``nn.Conv2d`` (the stem conv included) for its quantized twin.
Fixup's scalar biases and ``scale`` are float parameters applied in the block code, around the
quantized convs (a conv's input quantizer sees ``x + bias``); they stay float. The QDQ ONNX export
carries them as float ``Add`` / ``Mul`` nodes. The integer-only export (``int`` format,
:mod:`mmquant.export.int_graph`) does not take a Fixup model: it absorbs a constant ``Mul`` (the
``scale``) into a tensor's scale, but refuses an ``Add`` of a constant ("adds a constant"), which
every scalar bias is (it stops at the first one, the stem's). The SpaceToDepth rearrangement
runs on the float input, before the stem conv's input quantizer, as reshape / transpose nodes;
the integer export needs the graph input to go straight into a quantizer and stops at the first
``Reshape``, so a TResNet-stem model too exports to QDQ but not to ``int`` (both checked with
``mmquant.export.export_qdq`` / ``export_int`` on W8A8 models; the exporter is unchanged).
"""
import copy

import torch
import torch.utils.checkpoint as cp
from mmcv.cnn import build_activation_layer, build_conv_layer, build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init
from mmpretrain.models.backbones import ResNet
from mmpretrain.registry import MODELS
from torch import nn

from ..nn.norm_names import TwoNorms

__all__ = ['BLOCK_ORDERS', 'DOWNSAMPLE_STYLES', 'STEMS', 'OrderedBasicBlock', 'OrderedResNet', 'ScalarBias',
           'SpaceToDepth']

BLOCK_ORDERS = ('cbsa', 'bacs', 'cabs')
DOWNSAMPLE_STYLES = ('conv', 'avgpool_conv')
STEMS = ('resnet', 'tresnet')
#: convs per Fixup residual branch (the paper's ``m``): conv1 is scaled by ``L ** (-1 / (2m - 2))``
FIXUP_BRANCH_CONVS = 2


def _accepted(values):
    return ', '.join(repr(v) for v in values)


def check_order(order: str) -> str:
    if order not in BLOCK_ORDERS:
        raise ValueError(f'unknown block order {order!r}; accepted: {_accepted(BLOCK_ORDERS)}')
    return order


def check_downsample(style: str) -> str:
    if style not in DOWNSAMPLE_STYLES:
        raise ValueError(f'unknown downsample {style!r}; accepted: {_accepted(DOWNSAMPLE_STYLES)}')
    return style


def check_fixup(fixup, order: str) -> bool:
    if not isinstance(fixup, bool):
        raise ValueError(f'fixup={fixup!r}; accepted: True or False')
    if fixup and order != 'cbsa':
        raise ValueError(f"fixup=True with order={order!r}; accepted: fixup=True with order 'cbsa' only "
                         f"(fixup=False takes {_accepted(BLOCK_ORDERS)})")
    return fixup


def check_stem(stem: str) -> str:
    if stem not in STEMS:
        raise ValueError(f'unknown stem {stem!r}; accepted: {_accepted(STEMS)}')
    return stem


def check_space_to_depth(block_size, stem: str):
    """The SpaceToDepth block size of the ``'tresnet'`` stem (None: 4, the paper's); None for ``'resnet'``."""
    if stem != 'tresnet':
        if block_size is not None:
            raise ValueError(f"space_to_depth={block_size!r} with stem={stem!r}; accepted: space_to_depth "
                             "only with stem='tresnet' (None otherwise)")
        return None
    if block_size is None:
        return 4
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f'space_to_depth={block_size!r}; accepted: a positive integer block size '
                         '(2 or 4 for 28x28 inputs)')
    return block_size


def he_normal_(weight: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """In place: torch's He-normal for ReLU nets (``std = sqrt(2 / fan_in)``, He et al., ICCV 2015),
    scaled by ``factor``."""
    nn.init.kaiming_normal_(weight, mode='fan_in', nonlinearity='relu')
    with torch.no_grad():
        return weight.mul_(factor)


class ScalarBias(nn.Module):
    """``x + bias`` with one learnable scalar ``bias`` (zero-initialised): Fixup's stem bias."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + self.bias


class SpaceToDepth(nn.Module):
    """``[N, C, H, W] -> [N, C*b*b, H/b, W/b]`` with ``out[n, c*b*b + i*b + j, h, w] =
    x[n, c, b*h + i, b*w + j]``: every ``b x b`` patch moved into channels, nothing lost (the
    channel order of ``F.pixel_unshuffle``; ``F.pixel_shuffle(out, b)`` gives ``x`` back).

    >>> import torch
    >>> SpaceToDepth(2)(torch.arange(16.).reshape(1, 1, 4, 4))[0, :, 0, 0]
    tensor([0., 1., 4., 5.])
    """

    def __init__(self, block_size: int):
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f'SpaceToDepth block_size={block_size!r}; accepted: a positive integer')
        self.block_size = block_size

    def forward(self, x):
        n, c, h, w = x.shape
        b = self.block_size
        if h % b or w % b:
            raise ValueError(f'SpaceToDepth({b}): input height and width must be multiples of {b}, got {h}x{w}')
        x = x.reshape(n, c, h // b, b, w // b, b).permute(0, 1, 3, 5, 2, 4)   # n, c, i, j, h, w
        return x.reshape(n, c * b * b, h // b, w // b)

    def extra_repr(self):
        return f'block_size={self.block_size}'


class OrderedBasicBlock(TwoNorms, BaseModule):
    """A ResNet basic block (two 3x3 convs) in one of :data:`BLOCK_ORDERS` (see the module doc).

    The arguments are mmpretrain's ``BasicBlock``'s plus ``order``; the parts keep its names
    (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``relu``, ``downsample``). ``with_cp`` checkpoints
    the branch and the shortcut, ``drop_path_rate`` drops the branch before the sum.

    ``fixup=True`` (with ``order='cbsa'`` only) builds the Fixup block of the module doc: no norm
    layers (``norm1`` / ``norm2`` are None), the scalar parameters ``bias1a``, ``bias1b``,
    ``bias2a``, ``bias2b`` (0) and ``scale`` (1), and ``order`` reads ``'fixup'``.
    """
    expansion = 1

    def __init__(self, in_channels, out_channels, expansion=1, stride=1, dilation=1, downsample=None,
                 style='pytorch', with_cp=False, conv_cfg=None, norm_cfg=dict(type='BN'), drop_path_rate=0.0,
                 act_cfg=dict(type='ReLU', inplace=True), order='cbsa', fixup=False, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.fixup = check_fixup(fixup, check_order(order))
        # a Fixup branch is not conv-BN-ReLU: is_basic_block (mmquant.nn.binary_blocks) reads `order`
        self.order = 'fixup' if fixup else order
        if expansion != 1:
            raise ValueError(f'OrderedBasicBlock has expansion 1, got expansion={expansion}')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.mid_channels = out_channels
        self.expansion, self.stride, self.dilation, self.style = 1, stride, dilation, style
        self.with_cp, self.conv_cfg, self.norm_cfg = with_cp, conv_cfg, norm_cfg

        self.conv1 = build_conv_layer(conv_cfg, in_channels, out_channels, 3, stride=stride, padding=dilation,
                                      dilation=dilation, bias=False)
        self.conv2 = build_conv_layer(conv_cfg, out_channels, out_channels, 3, padding=1, bias=False)
        if fixup:
            self.norm1_name = self.norm2_name = None
            for name in ('bias1a', 'bias1b', 'bias2a', 'bias2b'):
                setattr(self, name, nn.Parameter(torch.zeros(1)))
            self.scale = nn.Parameter(torch.ones(1))
        else:
            # pre-activation normalises the block input; the other orders a conv output
            self.norm1_name, norm1 = build_norm_layer(norm_cfg, in_channels if order == 'bacs' else out_channels,
                                                      postfix=1)
            self.add_module(self.norm1_name, norm1)
            self.norm2_name, norm2 = build_norm_layer(norm_cfg, out_channels, postfix=2)
            self.add_module(self.norm2_name, norm2)
        act_cfg = copy.deepcopy(act_cfg)
        if order == 'cabs' and 'inplace' in act_cfg:
            act_cfg['inplace'] = False        # see the module doc
        self.relu = build_activation_layer(act_cfg)
        self.downsample = downsample
        self.drop_path = DropPath(drop_prob=drop_path_rate) if drop_path_rate > 1e-5 else nn.Identity()

    @property
    def norm1(self):
        return None if self.norm1_name is None else getattr(self, self.norm1_name)

    @property
    def norm2(self):
        return None if self.norm2_name is None else getattr(self, self.norm2_name)

    def fixup_init(self, num_blocks: int):
        """Fixup's initialisation of this block in a network of ``num_blocks`` residual blocks:
        ``conv1`` He-normal times ``num_blocks ** (-1 / (2m - 2))`` (``m`` = 2 convs per branch),
        ``conv2`` zero, the shortcut convs He-normal, the scalar biases 0 and ``scale`` 1."""
        if not self.fixup:
            raise ValueError('fixup_init needs a block built with fixup=True')
        he_normal_(self.conv1.weight, num_blocks ** (-1.0 / (2 * FIXUP_BRANCH_CONVS - 2)))
        nn.init.zeros_(self.conv2.weight)
        if self.downsample is not None:
            for m in self.downsample.modules():
                if isinstance(m, nn.Conv2d):
                    he_normal_(m.weight)
        with torch.no_grad():
            for p in (self.bias1a, self.bias1b, self.bias2a, self.bias2b):
                p.zero_()
            self.scale.fill_(1.0)

    def _shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)

    def _branch_and_sum(self, x):
        if self.fixup:
            xb = x + self.bias1a                # the shortcut conv reads it too
            out = self.relu(self.conv1(xb) + self.bias1b)
            out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
            shortcut = x if self.downsample is None else self.downsample(xb)
            return self.drop_path(out) + shortcut
        if self.order == 'cbsa':
            out = self.norm2(self.conv2(self.relu(self.norm1(self.conv1(x)))))
            shortcut = self._shortcut(x)
        elif self.order == 'cabs':
            out = self.norm2(self.relu(self.conv2(self.norm1(self.relu(self.conv1(x))))))
            shortcut = self._shortcut(x)
        else:   # 'bacs'
            pre = self.relu(self.norm1(x))
            out = self.conv2(self.relu(self.norm2(self.conv1(pre))))
            shortcut = x if self.downsample is None else self.downsample(pre)
        return self.drop_path(out) + shortcut

    def forward(self, x):
        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(self._branch_and_sum, x, use_reentrant=False)
        else:
            out = self._branch_and_sum(x)
        return self.relu(out) if self.order in ('cbsa', 'fixup') else out

    def extra_repr(self):
        return f'order={self.order!r}'


@MODELS.register_module()
class OrderedResNet(ResNet):
    """mmpretrain's ResNet (stem, stages, ``out_indices``, ``frozen_stages``, ``norm_eval``,
    ``deep_stem``, ...) built of :class:`OrderedBasicBlock` in the layer ``order`` of the module
    doc, with ``downsample`` shortcuts ``'conv'`` or ``'avgpool_conv'``.

    Args:
        depth: 18 or 34 (basic blocks).
        order: ``'cbsa'`` (default, the standard ResNet), ``'bacs'`` (pre-activation) or ``'cabs'``.
        downsample: ``'conv'`` (default) or ``'avgpool_conv'`` (replaces mmpretrain's ``avg_down``).
        act_cfg: the blocks' activation (and ``'bacs'``'s final one); the stem keeps its ReLU.
        fixup: True for Fixup (no norm layers, scalar biases, Fixup init; ``order='cbsa'`` only).
        stem: ``'resnet'`` (default, mmpretrain's 7x7 stride-2 conv, BN, ReLU, 3x3 max-pool) or
            ``'tresnet'`` (SpaceToDepth, 3x3 stride-1 conv, BN, ReLU; no max-pool).
        space_to_depth: the ``'tresnet'`` stem's block size (None: 4); only with that stem.
        **kwargs: the other arguments of mmpretrain's ``ResNet`` (``deep_stem`` only with
            ``stem='resnet'`` and ``fixup=False``).

    ``'bacs'`` adds ``final_norm`` (``bn_final``) and ``final_act`` after the last stage; its
    output is what the last stage returns (earlier ``out_indices`` stages return the raw sums,
    as pre-activation nets leave them). ``frozen_stages >= num_stages`` freezes ``final_norm``.

    ``zero_init_residual`` (default True) zeroes the scale of the BN that ends the residual
    branch (``bn2``) for ``'cbsa'`` and ``'cabs'``. A ``'bacs'`` branch ends in a conv, and
    zeroing its ``bn2`` would put the ReLU after it at 0 with zero gradient forever, so nothing
    is zeroed there. With ``fixup=True`` there is no BN: ``init_weights`` applies the Fixup
    initialisation instead (module doc), once, as mmengine applies ``init_cfg`` once, and not over
    a ``Pretrained`` ``init_cfg``. ``frozen_stages`` / ``norm_eval`` work as for the other
    variants (the stem's scalar bias is its ``norm1``; there are no BNs to keep in eval mode).

    To keep the shortcut convs float when quantizing: ``quant=dict(qconfig=dict(skip=
    ['*downsample*']))`` (:attr:`DOWNSAMPLE_SKIP`).

    >>> import torch
    >>> net = OrderedResNet(depth=18, in_channels=1, order='bacs', out_indices=(0, 1, 2, 3)).eval()
    >>> [tuple(o.shape) for o in net(torch.zeros(1, 1, 28, 28))]
    [(1, 64, 7, 7), (1, 128, 4, 4), (1, 256, 2, 2), (1, 512, 1, 1)]
    >>> net = OrderedResNet(depth=18, in_channels=1, fixup=True, stem='tresnet', space_to_depth=2).eval()
    >>> tuple(net(torch.zeros(1, 1, 28, 28))[-1].shape)
    (1, 512, 2, 2)
    """
    arch_settings = {
        18: (OrderedBasicBlock, (2, 2, 2, 2)),
        34: (OrderedBasicBlock, (3, 4, 6, 3)),
    }
    #: qconfig ``skip`` globs that keep every shortcut conv float
    DOWNSAMPLE_SKIP = ('*downsample*',)

    def __init__(self, depth, order='cbsa', downsample='conv', act_cfg=dict(type='ReLU', inplace=True),
                 fixup=False, stem='resnet', space_to_depth=None, **kwargs):
        if depth not in self.arch_settings:
            raise ValueError(f'OrderedResNet depth={depth!r}; accepted: '
                             f'{", ".join(map(str, self.arch_settings))} (basic blocks only)')
        if 'avg_down' in kwargs:
            raise ValueError("OrderedResNet takes downsample='avgpool_conv' (or 'conv'), not avg_down")
        # read by make_res_layer, which ResNet.__init__ calls
        self.order = check_order(order)
        self.downsample_style = check_downsample(downsample)
        self.fixup = check_fixup(fixup, order)
        self.stem_type = check_stem(stem)
        self.space_to_depth_size = check_space_to_depth(space_to_depth, stem)
        if kwargs.get('deep_stem') and (fixup or stem != 'resnet'):
            raise ValueError(f'deep_stem=True with fixup={fixup!r}, stem={stem!r}; accepted: deep_stem=True only '
                             "with fixup=False and stem='resnet' (its stem convs have BNs)")
        self.act_cfg = copy.deepcopy(act_cfg)
        super().__init__(depth, **kwargs)
        self.final_norm_name = None
        if self.order == 'bacs':
            self.final_norm_name, final_norm = build_norm_layer(self.norm_cfg, self.feat_dim, postfix='_final')
            self.add_module(self.final_norm_name, final_norm)
            self.final_act = build_activation_layer(self.act_cfg)
            self._freeze_stages()

    @property
    def final_norm(self):
        return None if self.final_norm_name is None else getattr(self, self.final_norm_name)

    def _make_stem_layer(self, in_channels, stem_channels):
        self.space_to_depth = None
        if self.deep_stem or (self.stem_type == 'resnet' and not self.fixup):
            return super()._make_stem_layer(in_channels, stem_channels)
        if self.stem_type == 'tresnet':
            b = self.space_to_depth_size
            self.space_to_depth = SpaceToDepth(b)
            self.conv1 = build_conv_layer(self.conv_cfg, in_channels * b * b, stem_channels, kernel_size=3,
                                          stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:           # the 'resnet' stem of a Fixup net
            self.conv1 = build_conv_layer(self.conv_cfg, in_channels, stem_channels, kernel_size=7, stride=2,
                                          padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        if self.fixup:      # the scalar bias takes the BN's place (and name slot: mmpretrain freezes `norm1`)
            self.norm1_name, norm1 = 'stem_bias', ScalarBias()
        else:
            self.norm1_name, norm1 = build_norm_layer(self.norm_cfg, stem_channels, postfix=1)
        self.add_module(self.norm1_name, norm1)
        self.relu = nn.ReLU(inplace=True)

    def _make_downsample(self, in_channels, out_channels, stride, conv_cfg, norm_cfg):
        layers, conv_stride = [], stride
        if self.downsample_style == 'avgpool_conv' and stride != 1:
            layers.append(nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False))
            conv_stride = 1
        layers.append(build_conv_layer(conv_cfg, in_channels, out_channels, kernel_size=1, stride=conv_stride,
                                       bias=False))
        if self.order != 'bacs' and not self.fixup:
            layers.append(build_norm_layer(norm_cfg, out_channels)[1])
        return nn.Sequential(*layers)

    def make_res_layer(self, block, num_blocks, in_channels, out_channels, stride=1, avg_down=False,
                       conv_cfg=None, norm_cfg=dict(type='BN'), drop_path_rate=0.0, **kwargs):
        rates = drop_path_rate if isinstance(drop_path_rate, (list, tuple)) else [drop_path_rate] * num_blocks
        if len(rates) != num_blocks:
            raise ValueError(f'{len(rates)} drop path rates for {num_blocks} blocks')
        layers = []
        for i in range(num_blocks):
            s, c_in = (stride, in_channels) if i == 0 else (1, out_channels)
            ds = (self._make_downsample(c_in, out_channels, s, conv_cfg, norm_cfg)
                  if s != 1 or c_in != out_channels else None)
            layers.append(block(in_channels=c_in, out_channels=out_channels, stride=s, downsample=ds,
                                conv_cfg=conv_cfg, norm_cfg=norm_cfg, drop_path_rate=rates[i],
                                act_cfg=self.act_cfg, order=self.order, fixup=self.fixup, **kwargs))
        return nn.Sequential(*layers)

    def _freeze_stages(self):
        super()._freeze_stages()
        # ResNet.__init__ freezes before final_norm exists; __init__ calls this again after it
        if getattr(self, 'final_norm_name', None) and self.frozen_stages >= self.num_stages:
            self.final_norm.eval()
            for p in self.final_norm.parameters():
                p.requires_grad = False

    def train(self, mode=True):
        super().train(mode)     # mmpretrain's ResNet.train returns None; nn.Module's returns self
        return self

    def init_weights(self):
        first = not self.is_init
        super().init_weights()      # mmpretrain's zero_init_residual only knows its own blocks
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            return
        if self.fixup:
            if first:               # over init_cfg's Kaiming (which would leave conv2 non-zero)
                self.fixup_init()
            return
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, OrderedBasicBlock) and m.order != 'bacs':
                    constant_init(m.norm2, 0)

    def fixup_init(self):
        """The Fixup initialisation (module doc): stem conv He-normal, its scalar bias 0, and
        :meth:`OrderedBasicBlock.fixup_init` on every block with ``L`` = the number of blocks."""
        if not self.fixup:
            raise ValueError('fixup_init needs OrderedResNet(fixup=True)')
        blocks = [m for m in self.modules() if isinstance(m, OrderedBasicBlock)]
        he_normal_(self.conv1.weight)
        nn.init.zeros_(self.norm1.bias)
        for blk in blocks:
            blk.fixup_init(len(blocks))

    def forward(self, x):
        if self.deep_stem:
            x = self.stem(x)
        else:
            if self.space_to_depth is not None:
                x = self.space_to_depth(x)
            x = self.relu(self.norm1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        last = len(self.res_layers) - 1
        for i, layer_name in enumerate(self.res_layers):
            x = getattr(self, layer_name)(x)
            if i == last and self.final_norm_name is not None:
                x = self.final_act(self.final_norm(x))
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
