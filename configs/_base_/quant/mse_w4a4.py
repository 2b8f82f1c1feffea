# PTQ scheme: mse calibration at W4A4; pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='mse', bits='w4a4')
