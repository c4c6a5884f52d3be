"""The classic World Models agent (Ha & Schmidhuber 2018): V (conv VAE, ``wmlab.models.vae``), M (MDN-RNN,
``wmlab.models.mdn_rnn``), C (linear controller trained with CMA-ES), the dream, the iterative procedure.

Stages (each a function in ``stages``; CLI: ``wmlab worldmodels <stage>``, see ``cli.worldmodels_main``):
collect -> train-vae -> train-rnn -> train-controller -> evaluate -> iterate -> report.
Submodules are imported on use: gymnasium[box2d], vizdoom and cma are needed only by what uses them.
"""
