# PTQ scheme: minmax calibration at W8A8; pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='minmax', bits='w8a8')
