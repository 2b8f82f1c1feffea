# QAT scheme: xnorpp at W1A1 (binary basic blocks; stem, classifier and downsample shortcuts 8-bit).
quant = dict(method='xnorpp', bits='w1a1')
