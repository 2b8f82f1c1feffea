# QAT scheme: groupnet at W1A1 (binary basic blocks; stem, classifier and downsample shortcuts 8-bit).
quant = dict(method='groupnet', bits='w1a1', branches=5)
