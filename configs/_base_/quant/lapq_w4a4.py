# PTQ scheme: lapq calibration at W4A4; pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='lapq', bits='w4a4')
