# QAT scheme: F8Net at W8A8 (Jin et al., ICLR 2022): fixed-point weights and activations whose
# fractional lengths come from their statistics, convs folding their BatchNorm while training,
# PACT clipping levels shared along residual streams. tools/train.py builds the model from it.
quant = dict(method='f8net', bits='w8a8')
