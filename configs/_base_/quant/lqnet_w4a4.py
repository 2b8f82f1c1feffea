# QAT scheme: lqnet at W4A4 (first and last layers 8-bit); tools/train.py builds the model from it.
quant = dict(method='lqnet', bits='w4a4')
