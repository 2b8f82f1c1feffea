# QAT scheme: lqnet at W2A2 (first and last layers 8-bit); tools/train.py builds the model from it.
quant = dict(method='lqnet', bits='w2a2')
