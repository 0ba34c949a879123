"""Keras 3's batch normalization in one fused TensorFlow kernel, the project's default."""
import tensorflow as tf
import keras


@keras.saving.register_keras_serializable(package="models")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization computed by TensorFlow's fused kernel
    (FusedBatchNormV3: oneDNN's on CPUs, cuDNN's on GPUs) for channels-last 4D and 5D
    float32, bfloat16 and float16 inputs; Keras 3 composes the moments and the normalization
    of separate operations, which made ResNet-20 train 1.3x slower than on tf_keras
    (BENCHMARKS.md). Other inputs (float64: the exactness runs), masks and renorm take
    Keras' own path. The moving variance averages the batch's biased variance, as Keras 3
    does (the kernel returns the unbiased one, which tf_keras averaged)."""

    def call(self, inputs, training=None, mask=None):
        if not self._fuses(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        volumes, shape = len(inputs.shape) == 5, tf.shape(inputs)
        if volumes:  # the kernel's NDHWC is its NHWC on D*H rows
            inputs = tf.reshape(inputs, [shape[0], shape[1] * shape[2], shape[3], shape[4]])
        channels = inputs.shape[-1]
        scale = self.gamma if self.scale else tf.ones([channels])
        offset = self.beta if self.center else tf.zeros([channels])
        if training and self.trainable:
            outputs, mean, variance = self._fused(inputs, scale, offset, tf.constant([]),
                                                  tf.constant([]), is_training=True)
            count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, variance.dtype)
            biased = variance * (count - 1) / count
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, biased)):
                moving.assign(moving * self.momentum + batch * (1.0 - self.momentum))
        else:
            outputs, _, _ = self._fused(inputs, scale, offset, self.moving_mean,
                                        self.moving_variance, is_training=False)
        # 4D outputs as they are: Grappler fuses the kernel with a ReLU after it
        return tf.cast(tf.reshape(outputs, shape) if volumes else outputs, self.compute_dtype)

    def _fuses(self, inputs, mask):
        rank = len(inputs.shape)
        return (mask is None and not self.renorm and not self.synchronized
                and rank in (4, 5) and self.axis in (-1, rank - 1)
                and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16))

    def _fused(self, inputs, scale, offset, mean, variance, is_training):
        """(outputs, the batch's mean, its unbiased variance) from TensorFlow's op itself:
        its Python wrapper raises an epsilon below 1.001e-5 (an old cuDNN's least) to it,
        which would change ResNet-50's 1e-5."""
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=scale, offset=offset, mean=mean, variance=variance,
            epsilon=self.epsilon, is_training=is_training)
        return outputs, mean, variance
