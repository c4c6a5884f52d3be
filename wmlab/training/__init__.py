"""Training loops of the models that are not trained by ``wmlab train`` (``wmlab/train.py``).

- ``vae.py``: V of the World Models agent, ``train_vae`` (+ ``FramePool``, its frame sampler) and
  ``encode_store`` (V's posteriors of every frame of a dataset, M's training data).
- ``mdn_rnn.py``: M of the World Models agent, ``SequenceSampler`` and ``train_rnn``.
- ``tokenizer.py``: ``train_tokenizer``, the projection + decoder of wmlab's DINO-Tok reimplementation.
- ``common.py``: the device and tensorboard helpers they (and the CMA-ES controller) share.

The modules, configs, losses, sampling and ``load_*`` functions stay in ``wmlab.models`` and
``wmlab.encoders``: this package imports them, never the reverse, so loading a trained model never pulls
in a training loop.
"""
