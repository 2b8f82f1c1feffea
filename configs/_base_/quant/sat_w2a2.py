# QAT scheme: sat at W2A2 (first and last layers 8-bit); tools/train.py builds the model from it.
# SAT's clip levels (input_quantizer.alpha) get the base weight decay, as PACT's (the paper's L2).
quant = dict(method='sat', bits='w2a2')
