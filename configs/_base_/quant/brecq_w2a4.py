# PTQ scheme: BRECQ (ICLR 2021) at W2A4: block reconstruction with AdaRound weights and learned
# activation steps, the paper's defaults spelled out (20000 iterations per unit is hours on a
# CPU: lower `iters` for a quick run); pair it with test_cfg = dict(type='PTQLoop').
quant = dict(method='brecq', bits='w2a4',
             options=dict(iters=20000, batch_size=32, lam=0.01, warmup=0.2, lr=None, act_lr=4e-3,
                          drop_prob=0.0))
