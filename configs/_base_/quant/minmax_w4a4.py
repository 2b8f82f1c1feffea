# PTQ scheme: minmax calibration at W4A4; pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='minmax', bits='w4a4')
