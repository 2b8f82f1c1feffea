"""tools/make_detection_set.py and configs/_base_/datasets/fashion_det.py on a tiny set."""
import importlib.util
import json
import os
import os.path as osp
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, write_config

# pycocotools' decode warns under numpy 2 about __array__(copy=...); harmless here
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

TINY = dict(train_images=12, val_images=6, canvas=96, min_size=20, max_size=48)


def _load_tool():
    path = osp.join(ROOT, 'tools', 'make_detection_set.py')
    spec = importlib.util.spec_from_file_location('make_detection_set', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mds = _load_tool()


@pytest.fixture(scope='module')
def built(fashion_mnist, tmp_path_factory):
    base = tmp_path_factory.mktemp('fashion_det')
    sets = {}
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        out = str(base / name)
        summary = mds.build_dataset(data_root=fashion_mnist, out=out, seed=seed, verbose=False,
                                    **TINY)
        sets[name] = (out, summary)
    return sets


def _read(out, split):
    with open(osp.join(out, 'annotations', f'instances_{split}.json'), 'rb') as f:
        return f.read()


def _pixels(out, split):
    return [np.asarray(Image.open(osp.join(out, split, name)))
            for name in sorted(os.listdir(osp.join(out, split)))]


def _idx_labels(data_root, prefix):
    _, labels = mds.load_items(data_root, prefix)
    return labels


def test_deterministic_for_a_seed(built):
    (a, _), (b, _), (c, _) = built['a'], built['b'], built['c']
    for split in ('train', 'val'):
        assert _read(a, split) == _read(b, split)
        assert _read(a, split) != _read(c, split)
        pa, pb, pc = _pixels(a, split), _pixels(b, split), _pixels(c, split)
        assert len(pa) == len(pb) == len(pc) == TINY[f'{split}_images']
        assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
        assert not all(np.array_equal(x, y) for x, y in zip(pa, pc))
        for img in pa:       # 3-channel grey, not a plain black background
            assert img.shape == (TINY['canvas'], TINY['canvas'], 3) and img.dtype == np.uint8
            assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
            assert np.count_nonzero(img[..., 0] == 0) < img[..., 0].size // 2
    with open(osp.join(a, 'manifest.json'), 'rb') as fa, open(osp.join(b, 'manifest.json'), 'rb') as fb:
        assert fa.read() == fb.read()


def test_annotations_match_masks(built):
    from pycocotools import mask as mask_utils
    out, _ = built['a']
    c = TINY['canvas']
    overlaps = 0
    for split in ('train', 'val'):
        coco = json.loads(_read(out, split))
        assert coco['categories'] == [dict(id=i + 1, name=n, supercategory='fashion')
                                      for i, n in enumerate(mds.CLASSES)]
        assert coco['categories'][0]['name'] == 'T-shirt/top'
        assert coco['categories'][9]['name'] == 'Ankle boot'
        assert [im['file_name'] for im in coco['images']] == sorted(os.listdir(osp.join(out, split)))
        assert all(im['width'] == c and im['height'] == c for im in coco['images'])
        assert len({a['id'] for a in coco['annotations']}) == len(coco['annotations'])
        by_image = {}
        for ann in coco['annotations']:
            assert isinstance(ann['segmentation']['counts'], str) and ann['iscrowd'] == 0
            assert 1 <= ann['category_id'] <= 10
            m = mask_utils.decode(dict(size=ann['segmentation']['size'],
                                       counts=ann['segmentation']['counts'].encode()))
            assert m.shape == (c, c)
            ys, xs = np.nonzero(m)
            x, y, w, h = ann['bbox']
            assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                    ys.max() - ys.min() + 1]
            assert ann['area'] == int(m.sum()) > 0
            assert x >= 0 and y >= 0 and x + w <= c and y + h <= c
            assert TINY['min_size'] // 4 <= max(w, h) <= TINY['max_size']
            by_image.setdefault(ann['image_id'], []).append(ann['bbox'])
        assert set(by_image) == {im['id'] for im in coco['images']}   # no empty canvas
        for boxes in by_image.values():
            for i, (x1, y1, w1, h1) in enumerate(boxes):
                for x2, y2, w2, h2 in boxes[i + 1:]:
                    overlaps += (min(x1 + w1, x2 + w2) > max(x1, x2)
                                 and min(y1 + h1, y2 + h2) > max(y1, y2))
    assert overlaps > 0


def test_sources_and_category_counts(built, fashion_mnist):
    out, summary = built['a']
    with open(osp.join(out, 'manifest.json')) as f:
        manifest = json.load(f)
    assert manifest['sources'] == summary['sources']
    expected_file = dict(train='train-images-idx3-ubyte', val='t10k-images-idx3-ubyte')
    for split, prefix in (('train', 'train'), ('val', 't10k')):
        src = summary['sources'][split]
        assert src['file'] == expected_file[split]
        labels = _idx_labels(fashion_mnist, prefix)
        coco = json.loads(_read(out, split))
        assert len(src['indices']) == len(coco['annotations'])
        assert all(0 <= i < len(labels) for i in src['indices'])
        assert [a['category_id'] for a in coco['annotations']] == \
            [int(labels[i]) + 1 for i in src['indices']]
        assert Counter(a['category_id'] for a in coco['annotations']) == \
            Counter(int(labels[i]) + 1 for i in src['indices'])
    # val draws from the 10000-item test split, train from the 60000-item train split
    assert len(_idx_labels(fashion_mnist, 't10k')) == 10000
    assert max(summary['sources']['train']['indices']) >= 10000


def test_refuses_existing_out_without_force(fashion_mnist, tmp_path, capsys):
    out = tmp_path / 'existing'
    out.mkdir()
    (out / 'keep.txt').write_text('x')
    argv = ['--data-root', fashion_mnist, '--out', str(out), '--train-images', '2',
            '--val-images', '1', '--canvas', '64', '--max-size', '32']
    with pytest.raises(SystemExit) as e:
        mds.main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--force' in err and str(out) in err
    assert os.listdir(out) == ['keep.txt']
    assert mds.main(argv + ['--force']) == 0
    assert sorted(os.listdir(out)) == ['annotations', 'manifest.json', 'train', 'val']
    assert sorted(os.listdir(tmp_path)) == ['existing']      # no temporary leftovers


def test_missing_data_root_is_one_clear_line(tmp_path, capsys, fashion_mnist):
    partial = tmp_path / 'partial'
    partial.mkdir()
    os.symlink(osp.join(fashion_mnist, 'train-images-idx3-ubyte'),
               partial / 'train-images-idx3-ubyte')
    for root, missing in ((tmp_path / 'nowhere', 't10k-images-idx3-ubyte'),
                          (partial, 'train-labels-idx1-ubyte')):
        out = tmp_path / 'out'
        with pytest.raises(SystemExit) as e:
            mds.main(['--data-root', str(root), '--out', str(out)])
        assert e.value.code not in (0, None)
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1, err
        assert 'scripts/install.sh' in err and missing in err and 'Traceback' not in err
        assert not out.exists()
    assert 'train-images-idx3-ubyte,' not in err     # only what is missing is named
    assert sorted(os.listdir(tmp_path)) == ['partial']


def test_mmdet_coco_dataset_from_base_config(built, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import DATASETS
    out, _ = built['a']
    base = osp.join(ROOT, 'configs', '_base_', 'datasets', 'fashion_det.py')
    cfg = Config.fromfile(write_config(tmp_path, (
        f"_base_ = {base!r}\n"
        f"data_root = {out + '/'!r}\n"
        "train_dataloader = dict(dataset=dict(data_root=data_root))\n"
        "val_dataloader = dict(dataset=dict(data_root=data_root))\n")))
    assert cfg.val_evaluator.metric == ['bbox', 'segm']
    assert cfg.train_dataloader.dataset.metainfo['classes'] == mds.CLASSES
    init_default_scope('mmdet')
    for split, loader in (('train', cfg.train_dataloader), ('val', cfg.val_dataloader)):
        coco = json.loads(_read(out, split))
        ds = DATASETS.build(loader.dataset)
        assert len(ds) == TINY[f'{split}_images']
        item = ds[0]
        sample = item['data_samples']
        anns = [a for a in coco['annotations'] if a['image_id'] == sample.img_id]
        gt = sample.gt_instances
        assert len(anns) > 0 and len(gt) == len(anns)
        assert tuple(gt.bboxes.shape) == (len(anns), 4)
        assert len(gt.masks) == len(anns) and gt.masks.height == TINY['canvas']
        assert tuple(item['inputs'].shape) == (3, TINY['canvas'], TINY['canvas'])
        if split == 'val':     # no flip: masks and boxes are exactly the stored ones
            assert [int(m.sum()) for m in gt.masks.masks] == [a['area'] for a in anns]
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)]
            assert np.allclose(gt.bboxes.tensor.numpy(), xyxy)
