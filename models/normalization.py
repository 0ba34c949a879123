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
        shape = tf.shape(inputs)
        if len(inputs.shape) == 5:  # the kernel's NDHWC is its NHWC on D*H rows
            inputs = tf.reshape(inputs, [shape[0], shape[1] * shape[2], shape[3], shape[4]])
        channels = inputs.shape[-1]
        scale = self.gamma if self.scale else tf.ones([channels])
        offset = self.beta if self.center else tf.zeros([channels])
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, scale, offset, epsilon=self.epsilon, is_training=True)
            count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, variance.dtype)
            biased = variance * (count - 1) / count
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, biased)):
                moving.assign(moving * self.momentum + batch * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, scale, offset, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, is_training=False)
        return tf.cast(tf.reshape(outputs, shape), self.compute_dtype)

    def _fuses(self, inputs, mask):
        rank = len(inputs.shape)
        return (mask is None and not self.renorm and not self.synchronized
                and rank in (4, 5) and self.axis in (-1, rank - 1)
                and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16)
                and self.epsilon >= 1.001e-5)  # the kernel's least
