# QAT scheme: bireal at W1A1 (binary basic blocks; stem, classifier and downsample shortcuts 8-bit).
quant = dict(method='bireal', bits='w1a1')
