# PTQ scheme: BitSplit (ICML 2020) at W3 with per-channel weight scales and the method's defaults
# spelled out; pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='bitsplit', bits='w3',
             options=dict(num_samples=4096, iters=4, error_compensation=False, bn_recalibration=False))
