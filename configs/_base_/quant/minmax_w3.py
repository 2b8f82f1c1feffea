# PTQ scheme: minmax calibration at W3; pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='minmax', bits='w3')
