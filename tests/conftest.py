import os
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA_ROOT = osp.join(ROOT, 'data', 'fashion_mnist')


@pytest.fixture(scope='session')
def root():
    return ROOT


@pytest.fixture(scope='session')
def fashion_mnist():
    """The un-gzipped Fashion-MNIST that scripts/install.sh prepares; a clear failure if absent."""
    if not osp.isfile(osp.join(DATA_ROOT, 't10k-images-idx3-ubyte')):
        pytest.fail(f'Fashion-MNIST is not in {DATA_ROOT}: run scripts/install.sh (make test does)')
    return DATA_ROOT


def _idx_head(path, n):
    """The first ``n`` items of an idx file (images: 16-byte header, labels: 8)."""
    import struct
    with open(path, 'rb') as f:
        magic = struct.unpack('>I', f.read(4))[0]
        dims = struct.unpack(f'>{magic & 0xFF}I', f.read(4 * (magic & 0xFF)))
        item = 1
        for d in dims[1:]:
            item *= d
        return struct.pack(f'>I{len(dims)}I', magic, n, *dims[1:]) + f.read(n * item)


def write_small_fashion_mnist(out, source, n_train, n_test):
    """The first ``n_train`` / ``n_test`` items of the Fashion-MNIST idx files in ``source``,
    written to the directory ``out`` (a data_root for quick training runs); returns ``str(out)``."""
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        for kind in ('images-idx3', 'labels-idx1'):
            name = f'{prefix}-{kind}-ubyte'
            (out / name).write_bytes(_idx_head(osp.join(source, name), n))
    return str(out)


def write_config(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def randomise_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters (a freshly built model has identity BNs)."""
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
