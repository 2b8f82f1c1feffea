# PTQ scheme: percentile calibration at W8A8; pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='percentile', bits='w8a8')
