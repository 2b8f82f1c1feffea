# PTQ scheme: kl calibration at W8A8; pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='kl', bits='w8a8')
