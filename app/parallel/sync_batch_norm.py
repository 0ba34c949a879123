"""Batch normalization whose batch statistics are those of the global batch (all ranks'
examples), for --sync_batch_norm: Horovod's SyncBatchNormalization with two mends."""
from app.horovod import hvd_tensorflow, keras, tf


class SyncBatchNormalization(hvd_tensorflow.SyncBatchNormalization):
    """Horovod's layer allreduces each rank's mean and mean of squares and takes the variance
    as E[x^2] - E[x]^2. In float32 that difference of two close numbers can come out
    negative (a channel with a large mean and a small spread), and normalizing by the square
    root of a negative variance gives NaN: the variance is clamped at 0 here. Horovod also
    names every instance alike, which a Keras model refuses; each gets its own name here."""

    def __init__(self, **kwargs):
        kwargs.setdefault("name", "sync_batch_normalization_"
                                  f"{keras.backend.get_uid('sync_batch_normalization')}")
        super().__init__(**kwargs)

    def _moments(self, inputs, *args, **kwargs):  # Keras 3's (inputs, mask)
        mean, variance = super()._moments(inputs, *args, **kwargs)
        return mean, tf.maximum(variance, tf.zeros_like(variance))
