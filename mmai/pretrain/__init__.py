"""Self-supervised pretraining of the image encoder (``mmai pretrain``): :mod:`mmai.pretrain.ssl`
(the objective), :mod:`mmai.pretrain.run` (the run folder)."""
