# PTQ scheme: aciq calibration at W4A4; pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='aciq', bits='w4a4')
