# PTQ scheme: BRECQ with QDrop (Wei et al., ICLR 2022): while a unit is reconstructed, each
# activation element (the unit's input included) stays float with probability 0.5.
quant = dict(method='brecq', bits='w2a4',
             options=dict(iters=20000, batch_size=32, lam=0.01, warmup=0.2, lr=None, act_lr=4e-3,
                          drop_prob=0.5))
