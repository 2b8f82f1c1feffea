# RetinaNet-R18, LSQ W4A4 quantization-aware training of the backbone only (QTool's detection switch
# "quantize backbone only vs everything"): FPN and head stay float. Everything else as
# ./retinanet_r18_lsq_w4a4.py (which quantizes all layers).
#   python tools/train.py configs/retinanet_r18_lsq_w4a4_backbone.py
_base_ = ['./retinanet_r18_lsq_w4a4.py']
quant = dict(qconfig=dict(only=['backbone.*']))
