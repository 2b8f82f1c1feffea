# QAT scheme: xnor at W1A1 (binary basic blocks; stem, classifier and downsample shortcuts 8-bit).
quant = dict(method='xnor', bits='w1a1')
