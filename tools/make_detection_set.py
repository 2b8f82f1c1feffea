"""Build a small COCO-format detection + instance-segmentation set from real Fashion-MNIST items.

Each canvas holds a few Fashion-MNIST item photos, rescaled and pasted at random places (later
items occlude earlier ones) over a faint noisy background with unannotated clutter. Every visible
item is annotated with its category, the tight box of its visible pixels, and its visible mask as
COCO RLE. Train canvases take items from the Fashion-MNIST train split, val canvases from the test
(t10k) split.

    python tools/make_detection_set.py                       # data/fashion_det, 3000 + 500 images
    python tools/make_detection_set.py --out /tmp/fd --train-images 100 --val-images 20 --force

Layout of --out:
    train/000000.png ...                 3-channel PNG canvases (grey replicated)
    val/000000.png ...
    annotations/instances_train.json     COCO; file_name is relative to the split folder
    annotations/instances_val.json
    manifest.json                        generation settings and, per split, the source idx file
                                         and the item index behind every annotation (in order)
"""
import argparse
import contextlib
import io
import json
import os
import os.path as osp
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_DATA_ROOT = osp.join(ROOT, 'data', 'fashion_mnist')
DEFAULT_OUT = osp.join(ROOT, 'data', 'fashion_det')

CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
           'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

# split name in the output -> prefix of the Fashion-MNIST idx files it draws items from
SOURCE_PREFIX = {'train': 'train', 'val': 't10k'}
SPLIT_STREAM = {'train': 0, 'val': 1}      # separate random streams per split

MASK_THRESHOLD = 24      # item pixel (0..255, after rescaling) above this is foreground
MIN_ITEM_PEAK = 200      # dim items are stretched so their brightest pixel reaches this
MIN_MASK_PIXELS = 16     # an item whose rescaled mask is smaller than this is not used
PLACE_TRIES = 20         # positions tried per object before it is skipped
NEAR_PROB = 0.5          # chance an object is placed next to an earlier one (forces overlap)
ASPECT_JITTER = 0.15     # height = side * exp(U(-j, j)), clipped to [min-size, max-size]
FRAGMENTS_PER_CLUTTER = 4  # clutter c gives Poisson(4 c) faint fragments per canvas


class DataRootError(Exception):
    """Fashion-MNIST is missing or incomplete."""


# ---------------------------------------------------------------------------------------------
# reading Fashion-MNIST
# ---------------------------------------------------------------------------------------------
def idx_files(prefix):
    return f'{prefix}-images-idx3-ubyte', f'{prefix}-labels-idx1-ubyte'


def _read_idx(path, ndim):
    with open(path, 'rb') as f:
        raw = f.read()
    name = osp.basename(path)
    if len(raw) < 4 + 4 * ndim or raw[:2] != b'\0\0' or raw[2] != 0x08 or raw[3] != ndim:
        raise DataRootError(f'{path} is not an uint8 idx file with {ndim} dimension(s)')
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype='>u4', count=ndim, offset=4))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(shape)):
        raise DataRootError(f'{name} in {osp.dirname(path)} is incomplete '
                            f'({len(raw) - start} of {int(np.prod(shape))} data bytes)')
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def check_data_root(data_root):
    """Raise DataRootError naming every missing Fashion-MNIST file."""
    wanted = [f for prefix in SOURCE_PREFIX.values() for f in idx_files(prefix)]
    missing = [f for f in wanted if not osp.isfile(osp.join(data_root, f))]
    if missing:
        raise DataRootError(f'Fashion-MNIST is not complete in {data_root}: missing '
                            f'{", ".join(missing)} (scripts/install.sh prepares it)')


def load_items(data_root, prefix):
    """(images uint8 [N, 28, 28], labels uint8 [N]) of one Fashion-MNIST split ('train'/'t10k')."""
    img_file, lbl_file = idx_files(prefix)
    images = _read_idx(osp.join(data_root, img_file), 3)
    labels = _read_idx(osp.join(data_root, lbl_file), 1)
    if len(images) != len(labels) or len(images) == 0:
        raise DataRootError(f'{img_file} and {lbl_file} in {data_root} disagree '
                            f'({len(images)} images, {len(labels)} labels)')
    if labels.max() >= len(CLASSES):
        raise DataRootError(f'{lbl_file} in {data_root} has labels outside 0..{len(CLASSES) - 1}')
    return images, labels


# ---------------------------------------------------------------------------------------------
# composing one canvas
# ---------------------------------------------------------------------------------------------
def _resize(arr, width, height):
    """Bilinear resize of a 2-D array (uint8 or float32) with PIL, returned as float32."""
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode='F')
    return np.asarray(img.resize((int(width), int(height)), Image.BILINEAR), dtype=np.float32)


def make_background(rng, canvas, items, clutter):
    """Low-intensity smooth + pixel noise, plus Poisson(4*clutter) faint unannotated fragments:
    low-contrast crops of other items (70 %) or soft textured blobs (30 %)."""
    coarse = rng.random((5, 5), dtype=np.float32) * 14.0
    bg = _resize(coarse, canvas, canvas) + rng.integers(0, 9, (canvas, canvas)).astype(np.float32)
    n_frag = int(rng.poisson(FRAGMENTS_PER_CLUTTER * clutter)) if clutter > 0 else 0
    for _ in range(n_frag):
        if rng.random() < 0.7:
            item = items[rng.integers(len(items))]
            ch, cw = (int(v) for v in rng.integers(8, 17, 2))
            y0, x0 = int(rng.integers(0, 29 - ch)), int(rng.integers(0, 29 - cw))
            size = int(rng.integers(10, 29))
            frag = _resize(item[y0:y0 + ch, x0:x0 + cw], size, size) * rng.uniform(0.12, 0.3)
        else:
            size = int(rng.integers(8, 25))
            tex = _resize(rng.random((4, 4), dtype=np.float32), size, size)
            r = np.hypot(*np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size)))
            frag = tex * np.clip(1.0 - r, 0.0, 1.0) * rng.uniform(25.0, 60.0)
        size = min(frag.shape[0], canvas)
        frag = frag[:size, :size]
        y, x = int(rng.integers(0, canvas - size + 1)), int(rng.integers(0, canvas - size + 1))
        np.maximum(bg[y:y + size, x:x + size], frag, out=bg[y:y + size, x:x + size])
    return bg


def tight_box(mask):
    """[x, y, w, h] of the smallest box around the True pixels of a 2-D mask (None if empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _prepare_item(item, width, height):
    """Rescale one 28x28 item; returns (pixels float32 [h, w], foreground mask bool [h, w])."""
    item = item.astype(np.float32)
    peak = float(item.max())
    if 0 < peak < MIN_ITEM_PEAK:
        item = item * (MIN_ITEM_PEAK / peak)
    pix = np.clip(_resize(item, width, height), 0, 255)
    return pix, pix > MASK_THRESHOLD


def compose_canvas(rng, items, opts):
    """One canvas: returns (grey uint8 [C, C], objects) where each object is a dict with
    'source' (index into items), 'visible' (bool [C, C]) and 'full' (foreground pixel count).

    Objects are pasted in order, each occluding those before it. A position is rejected when it
    would leave an earlier object with less than min_visible of its foreground visible; after
    PLACE_TRIES rejected positions the object is not pasted at all, so every item that can be seen
    is annotated."""
    c = opts['canvas']
    canvas = make_background(rng, c, items, opts['clutter'])
    objects = []
    n_obj = int(rng.integers(opts['min_objects'], opts['max_objects'] + 1))
    for _ in range(n_obj):
        src = int(rng.integers(len(items)))
        side = int(rng.integers(opts['min_size'], opts['max_size'] + 1))
        other = int(round(side * np.exp(rng.uniform(-ASPECT_JITTER, ASPECT_JITTER))))
        other = min(max(other, opts['min_size']), opts['max_size'])
        w, h = (side, other) if rng.random() < 0.5 else (other, side)
        pix, fg = _prepare_item(items[src], w, h)
        if fg.sum() < MIN_MASK_PIXELS:
            continue
        for _try in range(PLACE_TRIES):
            if objects and rng.random() < NEAR_PROB:
                bx, by, bw, bh = objects[int(rng.integers(len(objects)))]['box']
                cx = bx + bw / 2 + rng.uniform(-0.6, 0.6) * (bw + w) / 2
                cy = by + bh / 2 + rng.uniform(-0.6, 0.6) * (bh + h) / 2
                x = min(max(int(round(cx - w / 2)), 0), c - w)
                y = min(max(int(round(cy - h / 2)), 0), c - h)
            else:
                x, y = int(rng.integers(0, c - w + 1)), int(rng.integers(0, c - h + 1))
            ok = all(
                o['count'] - int(np.count_nonzero(o['visible'][y:y + h, x:x + w] & fg))
                >= opts['min_visible'] * o['full'] for o in objects)
            if ok:
                break
        else:
            continue
        for o in objects:
            o['visible'][y:y + h, x:x + w] &= ~fg
            o['count'] = int(np.count_nonzero(o['visible']))
            o['box'] = tight_box(o['visible'])
        visible = np.zeros((c, c), dtype=bool)
        visible[y:y + h, x:x + w] = fg
        region = canvas[y:y + h, x:x + w]
        region[fg] = pix[fg]
        full = int(np.count_nonzero(fg))
        objects.append(dict(source=src, visible=visible, full=full, count=full,
                            box=tight_box(visible)))
    grey = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return grey, [dict(source=o['source'], visible=o['visible'], full=o['full']) for o in objects]


# ---------------------------------------------------------------------------------------------
# writing a split
# ---------------------------------------------------------------------------------------------
def categories():
    return [dict(id=i + 1, name=name, supercategory='fashion') for i, name in enumerate(CLASSES)]


def build_split(items, labels, n_images, rng, opts, img_dir):
    """Compose n_images canvases, write them as PNG into img_dir and return
    (coco dict, sources) where sources[k] is the item index behind annotation k."""
    from pycocotools import mask as mask_utils
    os.makedirs(img_dir, exist_ok=True)
    c = opts['canvas']
    coco_images, annotations, sources = [], [], []
    for img_id in range(1, n_images + 1):
        grey, objects = compose_canvas(rng, items, opts)
        file_name = f'{img_id - 1:06d}.png'
        Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode='RGB').save(
            osp.join(img_dir, file_name), compress_level=1)
        coco_images.append(dict(id=img_id, file_name=file_name, width=c, height=c))
        for o in objects:
            rle = mask_utils.encode(np.asfortranarray(o['visible'].astype(np.uint8)))
            annotations.append(dict(
                id=len(annotations) + 1, image_id=img_id,
                category_id=int(labels[o['source']]) + 1,
                bbox=tight_box(o['visible']), area=int(np.count_nonzero(o['visible'])),
                segmentation=dict(size=[int(v) for v in rle['size']],
                                  counts=rle['counts'].decode('ascii')),
                iscrowd=0))
            sources.append(o['source'])
    coco = dict(info=dict(description='Fashion-MNIST items composed onto canvases (mmquant)',
                          version='1.0'),
                images=coco_images, annotations=annotations, categories=categories())
    return coco, sources


def validate(out_dir, splits):
    """Re-read the annotation files with pycocotools; every decoded mask must match the stored
    area and bbox. Returns per split (n_images, n_objects, sum sqrt(w*h), sum area)."""
    from pycocotools.coco import COCO
    stats = {}
    for split in splits:
        path = osp.join(out_dir, 'annotations', f'instances_{split}.json')
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(path)
        if sorted(coco.getCatIds()) != list(range(1, len(CLASSES) + 1)):
            raise RuntimeError(f'{path}: categories are not 1..{len(CLASSES)}')
        side_sum = area_sum = 0.0
        for ann in coco.dataset['annotations']:
            img = coco.imgs[ann['image_id']]
            m = coco.annToMask(ann)
            if m.shape != (img['height'], img['width']):
                raise RuntimeError(f'{path}: annotation {ann["id"]} mask has shape {m.shape}')
            if int(m.sum()) != ann['area'] or tight_box(m > 0) != ann['bbox']:
                raise RuntimeError(f'{path}: annotation {ann["id"]} mask disagrees with its '
                                   f'area/bbox')
            side_sum += float(np.sqrt(ann['bbox'][2] * ann['bbox'][3]))
            area_sum += ann['area']
        for img in coco.dataset['images']:
            if not osp.isfile(osp.join(out_dir, split, img['file_name'])):
                raise RuntimeError(f'{path}: image {img["file_name"]} was not written')
        stats[split] = (len(coco.dataset['images']), len(coco.dataset['annotations']),
                        side_sum, area_sum)
    return stats


def _dump_json(obj, path):
    with open(path, 'w') as f:
        json.dump(obj, f, separators=(',', ':'))
        f.write('\n')


def build_dataset(data_root=DEFAULT_DATA_ROOT, out=DEFAULT_OUT, train_images=3000, val_images=500,
                  canvas=128, min_objects=2, max_objects=5, min_size=24, max_size=64, seed=0,
                  clutter=0.5, min_visible=0.4, force=False, verbose=True):
    """Build the whole set into a temporary sibling of ``out``, validate it, then rename it to
    ``out``. Returns a summary dict; summary['sources'][split] = dict(file=<idx images file>,
    indices=[item index per annotation, in annotation order])."""
    t0 = time.perf_counter()
    out = osp.abspath(out)
    if osp.exists(out) and not force:
        raise FileExistsError(f'{out} already exists (use --force to overwrite it)')
    check_data_root(data_root)
    opts = dict(canvas=canvas, min_objects=min_objects, max_objects=max_objects,
                min_size=min_size, max_size=max_size, clutter=clutter, min_visible=min_visible)
    counts = dict(train=train_images, val=val_images)

    parent = osp.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(out)}.tmp-', dir=parent)
    try:
        os.makedirs(osp.join(tmp, 'annotations'))
        sources = {}
        for split, prefix in SOURCE_PREFIX.items():
            items, labels = load_items(data_root, prefix)
            rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_STREAM[split]]))
            coco, src = build_split(items, labels, counts[split], rng, opts, osp.join(tmp, split))
            _dump_json(coco, osp.join(tmp, 'annotations', f'instances_{split}.json'))
            sources[split] = dict(file=idx_files(prefix)[0], indices=src)
        _dump_json(dict(settings=dict(opts, seed=seed, train_images=train_images,
                                      val_images=val_images, mask_threshold=MASK_THRESHOLD),
                        sources=sources), osp.join(tmp, 'manifest.json'))
        stats = validate(tmp, SOURCE_PREFIX)
        if osp.exists(out):             # only reachable with force
            trash = tempfile.mkdtemp(prefix=f'.{osp.basename(out)}.old-', dir=parent)
            os.rename(out, osp.join(trash, 'old'))
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    seconds = time.perf_counter() - t0
    n_obj = sum(s[1] for s in stats.values())
    summary = dict(out=out, seconds=seconds, sources=sources,
                   splits={k: dict(images=s[0], objects=s[1]) for k, s in stats.items()},
                   mean_box_side=sum(s[2] for s in stats.values()) / max(n_obj, 1),
                   mean_area=sum(s[3] for s in stats.values()) / max(n_obj, 1))
    if verbose:
        print(f'wrote {out} (canvas {canvas}x{canvas}, seed {seed}; validated with pycocotools)')
        for split, s in summary['splits'].items():
            print(f'  {split:5s}: {s["images"]:6d} images {s["objects"]:7d} objects '
                  f'({s["objects"] / max(s["images"], 1):.2f}/image) '
                  f'items from {sources[split]["file"]}')
        print(f'  mean object: box side {summary["mean_box_side"]:.1f} px (sqrt(w*h)), '
              f'visible area {summary["mean_area"]:.0f} px; {seconds:.1f} s')
    return summary


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-root', default=DEFAULT_DATA_ROOT, help='un-gzipped Fashion-MNIST')
    p.add_argument('--out', default=DEFAULT_OUT)
    p.add_argument('--train-images', type=int, default=3000)
    p.add_argument('--val-images', type=int, default=500)
    p.add_argument('--canvas', type=int, default=128, help='side of the square canvas')
    p.add_argument('--min-objects', type=int, default=2)
    p.add_argument('--max-objects', type=int, default=5)
    p.add_argument('--min-size', type=int, default=24, help='smallest object side in pixels')
    p.add_argument('--max-size', type=int, default=64, help='largest object side in pixels')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--clutter', type=float, default=0.5,
                   help='amount of unannotated clutter: Poisson(4*clutter) faint fragments per '
                        'canvas (0 = none)')
    p.add_argument('--min-visible', type=float, default=0.4,
                   help='an earlier object may not be occluded below this visible fraction')
    p.add_argument('--force', action='store_true', help='overwrite an existing --out')
    args = p.parse_args(argv)
    if args.train_images < 0 or args.val_images < 0:
        p.error('--train-images and --val-images must be >= 0')
    if not 1 <= args.min_objects <= args.max_objects:
        p.error('need 1 <= --min-objects <= --max-objects')
    if not 4 <= args.min_size <= args.max_size <= args.canvas:
        p.error('need 4 <= --min-size <= --max-size <= --canvas')
    if args.clutter < 0 or not 0 <= args.min_visible <= 1:
        p.error('need --clutter >= 0 and 0 <= --min-visible <= 1')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        build_dataset(data_root=args.data_root, out=args.out, train_images=args.train_images,
                      val_images=args.val_images, canvas=args.canvas,
                      min_objects=args.min_objects, max_objects=args.max_objects,
                      min_size=args.min_size, max_size=args.max_size, seed=args.seed,
                      clutter=args.clutter, min_visible=args.min_visible, force=args.force)
    except (DataRootError, FileExistsError) as e:
        print(f'make_detection_set: error: {e}', file=sys.stderr)
        raise SystemExit(2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
