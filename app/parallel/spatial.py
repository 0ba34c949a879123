"""Spatial parallelism's runtime: a Keras model rewritten to run on one slab of every example
(app.parallel.kinds.SpatialParallel chooses the slabs and the groups).

Every example is split along its first spatial axis (axis 1 of a batch) into `parts` slabs
of equal extent, slab p on rank p of a spatial group (a Horovod process set). A layer that
looks across that axis needs its neighbours' boundary planes: a convolution with `same`
padding receives them (the halos) from the ranks before and after it with one Horovod
alltoall on the group's process set, whose registered gradient sends the halos' gradients
back to their owners in the backward pass, where they are added. Pooling by its own stride,
nearest upsampling and everything that acts voxel by voxel stay local, batch normalization takes its
statistics over the group, and the losses sum what they sum over the whole example
(models.segmentation's `example_sum`). A convolution whose kernel spans one plane along the
axis needs no halo and stays as it is. A layer that would mix the slabs otherwise (Flatten,
global pooling, a Dense over space, a convolution over several planes that is not `same`,
non-nearest upsampling) is refused by name.

Each rank's loss is its slab's share of the example's loss times `parts` (a mean over the
slab's voxels, or the whole example's loss where the loss sums over the group), so that the
sum of the group's gradients is `parts` times the example's, and Horovod's average over all
N = parts x replicas ranks is the average of the replicas' gradients: what one process
computes on the whole global batch.
"""
import math

from app.horovod import hvd_tensorflow, keras, tf
from app.parallel.sync_batch_norm import SyncBatchNormalization
from models.unet import Level, MaxPooling3D


class SpatialError(ValueError):
    """A layer of the model that cannot run on slabs, and why."""


def same_padding(extent, kernel, stride, dilation=1):
    """(before, after): the zeros TensorFlow's `same` padding puts around an axis."""
    effective = (kernel - 1) * dilation + 1
    total = max(effective - (stride if extent % stride == 0 else extent % stride), 0)
    return total // 2, total - total // 2


def _first_axis_first(tensor):
    """`tensor` with its axes 0 and 1 swapped (alltoall and allgather split axis 0)."""
    return tf.transpose(tensor, [1, 0, *range(2, tensor.shape.rank)])


def with_halos(slab, before, after, part, parts, process_set):
    """`slab` [batch, planes, ...] with the previous slab's last `before` planes in front and
    the next slab's first `after` behind (zeros beyond the example's ends, as `same` padding
    puts there): one alltoall on the group's process set, every rank of which calls it."""
    sends, splits = [slab[:, :0]], [0] * parts
    if part > 0:
        sends.append(slab[:, :after])
        splits[part - 1] = after
    if part < parts - 1:
        sends.append(slab[:, slab.shape[1] - before:])
        splits[part + 1] = before
    sent = _first_axis_first(tf.concat(sends, axis=1))
    if sent.dtype == tf.bfloat16:  # Horovod's alltoall takes no bfloat16; float32 holds it
        sent = tf.cast(sent, tf.float32)
    received, _ = hvd_tensorflow.alltoall(sent, splits=splits, process_set=process_set)
    got_before, got_after = (before if part > 0 else 0), (after if part < parts - 1 else 0)
    received = tf.ensure_shape(_first_axis_first(tf.cast(received, slab.dtype)),
                               [slab.shape[0], got_before + got_after, *slab.shape[2:]])
    front = received[:, :got_before] if part > 0 else tf.zeros_like(slab[:, :before])
    back = received[:, got_before:] if part < parts - 1 else tf.zeros_like(slab[:, :after])
    return tf.concat([front, slab, back], axis=1)


def gather_slabs(slab, process_set):
    """The whole example(s) of the group's slabs `slab` [batch, planes, ...], on every rank
    of the group (a collective)."""
    return _first_axis_first(hvd_tensorflow.allgather(_first_axis_first(slab),
                                                      process_set=process_set))


def group_sum(process_set):
    """A function summing a tensor over the group, with a gradient (Horovod's allreduce's)."""
    def summed(tensor):
        return hvd_tensorflow.allreduce(tensor, op=hvd_tensorflow.Sum, process_set=process_set)
    return summed


_HALO_CLASSES = {}


def _planes_spanned(convolution):
    """How many planes along axis 1 one output of `convolution` reads (its dilated kernel)."""
    return (convolution.kernel_size[0] - 1) * convolution.dilation_rate[0] + 1


def _halo_convolution(convolution_class):
    """The subclass of a Keras convolution class for a `same` convolution over several
    planes along axis 1 (check_layer refuses any other padding there) that pads its input
    itself: halos along axis 1, TensorFlow's `same` zeros along the others, then a `valid`
    convolution; its variables are the convolution's, so that checkpoints are those of the
    whole model."""
    if convolution_class not in _HALO_CLASSES:
        class HaloConvolution(convolution_class):
            def __init__(self, part=0, parts=1, process_set=None, **config):
                super().__init__(**{**config, "padding": "valid"})
                self.part, self.parts, self.process_set = part, parts, process_set

            def get_config(self):
                """The whole model's `same` convolution and this slab's place (the process
                set as the object itself: clone_model works from configs in memory)."""
                return {**super().get_config(), "padding": "same", "part": self.part,
                        "parts": self.parts, "process_set": self.process_set}

            def same_paddings(self, shape):
                """(before, after) along each spatial axis of an input of `shape`."""
                return [same_padding(extent, kernel, stride, dilation)
                        for extent, kernel, stride, dilation in zip(
                            shape[1:-1], self.kernel_size, self.strides, self.dilation_rate)]

            def call(self, inputs):
                padding = self.same_paddings(inputs.shape)
                padded = with_halos(inputs, *padding[0], self.part, self.parts,
                                    self.process_set)
                padded = tf.pad(padded, [[0, 0], [0, 0], *padding[1:], [0, 0]])
                outputs = self.convolution_op(padded, self.kernel)
                if self.use_bias:
                    outputs = tf.nn.bias_add(outputs, self.bias)
                return outputs if self.activation is None else self.activation(outputs)

            def compute_output_shape(self, input_shape):
                shape = tf.TensorShape(input_shape).as_list()
                padded = [shape[0], *(extent + sum(pads) for extent, pads in zip(
                    shape[1:-1], self.same_paddings(shape))), shape[-1]]
                return super().compute_output_shape(padded)

        HaloConvolution.__name__ = f"Halo{convolution_class.__name__}"
        _HALO_CLASSES[convolution_class] = HaloConvolution
    return _HALO_CLASSES[convolution_class]


class GroupBatchNormalization(SyncBatchNormalization):
    """Batch normalization with the statistics of the spatial group's slabs (the replica's
    whole examples): Horovod's SyncBatchNormalization averages over every rank and takes no
    process set."""

    def __init__(self, process_set=None, group_size=1, **kwargs):
        super().__init__(**kwargs)
        self.process_set, self.group_size = process_set, group_size

    def get_config(self):
        return {**super().get_config(), "process_set": self.process_set,
                "group_size": self.group_size}

    def _moments(self, inputs, *args, **kwargs):  # Keras 3's (inputs, mask)
        mean, variance = keras.layers.BatchNormalization._moments(  # noqa: SLF001
            self, inputs, *args, **kwargs)
        summed = hvd_tensorflow.allreduce(tf.stack([mean, variance + tf.square(mean)]),
                                          op=hvd_tensorflow.Sum, process_set=self.process_set)
        mean, mean_of_square = tf.unstack(summed / self.group_size)
        return mean, tf.maximum(mean_of_square - tf.square(mean), 0)


_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
               keras.layers.Conv3DTranspose, keras.layers.SeparableConv1D,
               keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
_POOLING = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
            keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
            keras.layers.AveragePooling3D)
_VOXELWISE = (keras.layers.InputLayer, keras.layers.Activation, keras.layers.ReLU,
              keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.Dropout,
              keras.layers.GaussianNoise, keras.layers.Rescaling, keras.layers.Add,
              keras.layers.Subtract, keras.layers.Multiply, keras.layers.Average,
              keras.layers.Maximum, keras.layers.Minimum, keras.layers.UpSampling1D,
              keras.layers.UpSampling2D, keras.layers.UpSampling3D)


def _refused(layer, reason):
    return SpatialError(f"layer {layer.name!r} ({type(layer).__name__}) {reason}")


def check_layer(layer, slab_shape):
    """Raises SpatialError unless `layer`, given a slab of `slab_shape` (without the batch
    axis), computes its slab of the whole example's output with what this module adds."""
    planes = slab_shape[0]
    if isinstance(layer, _CONVOLUTIONS) and not isinstance(layer, _TRANSPOSED):
        if layer.data_format != "channels_last":
            raise _refused(layer, "is channels_first; slabs are split along axis 1 of "
                                  "channels_last tensors")
        kernel, stride = layer.kernel_size[0], layer.strides[0]
        if layer.groups > 1:
            raise _refused(layer, "is a grouped convolution")
        if _planes_spanned(layer) > 1 and layer.padding != "same":
            raise _refused(layer, f"has {layer.padding} padding: only `same` padding "
                                  f"splits along the slabs' axis")
        if planes % stride:
            raise _refused(layer, f"strides by {stride} along the slabs' axis, which does "
                                  f"not divide a slab's {planes} planes")
        if max(same_padding(planes, kernel, stride, layer.dilation_rate[0])) > planes:
            raise _refused(layer, f"needs more halo planes than a slab's {planes}")
    elif isinstance(layer, _POOLING):
        size, stride = layer.pool_size[0], layer.strides[0]
        if size != stride or planes % stride:
            raise _refused(layer, f"pools {size} planes by {stride} along the slabs' axis: "
                                  f"only pooling by its own stride, which divides a slab's "
                                  f"{planes} planes, stays within the slabs")
    elif isinstance(layer, MaxPooling3D):
        if planes % 2:
            raise _refused(layer, f"pools by 2, which does not divide a slab's {planes} planes")
    elif isinstance(layer, keras.layers.Concatenate):
        if layer.axis in (1, 1 - len(slab_shape) - 1):
            raise _refused(layer, "concatenates along the slabs' axis")
    elif isinstance(layer, keras.layers.Softmax):
        if layer.axis not in (-1, len(slab_shape)):
            raise _refused(layer, "normalizes across space")
    elif isinstance(layer, keras.layers.Dense):
        if len(slab_shape) < 2:
            raise _refused(layer, "mixes space: its input has no spatial axis left")
    elif isinstance(layer, keras.layers.BatchNormalization):
        if layer.axis not in (len(slab_shape), -1):  # Keras 3 keeps one axis, an int
            raise _refused(layer, "normalizes along a spatial axis")
    elif isinstance(layer, keras.layers.UpSampling2D) and layer.interpolation != "nearest":
        raise _refused(layer, f"interpolates ({layer.interpolation}) between planes across "
                              f"the slabs' seams: only nearest upsampling stays within them")
    elif not isinstance(layer, _VOXELWISE):
        raise _refused(layer, "mixes the slabs (it is not a convolution, pooling, "
                              "upsampling, normalization or voxel-wise layer)")


def _layers_and_input_shapes(model):
    """(layer, input shape with the batch axis) of every layer but the input (a Sequential
    model lists none), those a U-Net Level runs included; a layer of several inputs once per
    input."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        shapes = [tensor.shape for tensor in inputs]
        for shape in shapes:
            if isinstance(layer, Level):
                for inner in layer.inner:
                    yield inner, tuple(shape)
                    shape = inner.compute_output_shape(shape)
            else:
                yield layer, tuple(shape)


def halo_bytes(model, parts, batch, bytes_per_value):
    """The bytes a spatial group's halo exchanges send in one training step of `batch`
    examples of `model`'s input split into `parts` slabs: every inner slab boundary's halo
    planes, forward and their gradients backward (a recomputed level sends its forward ones
    again)."""
    values = 0
    for layer, shape in _layers_and_input_shapes(model):
        if isinstance(layer, _CONVOLUTIONS) and not isinstance(layer, _TRANSPOSED):
            planes = sum(same_padding(shape[1] // parts, layer.kernel_size[0], layer.strides[0],
                                      layer.dilation_rate[0]))
            passes = 3 if any(isinstance(outer, Level) and outer.recompute
                              and layer in outer.inner for outer in model.layers) else 2
            values += passes * (parts - 1) * planes * math.prod(shape[2:]) * batch
    return values * bytes_per_value


def split_model(model, part, parts, process_set):
    """`model` (functional, channels_last) rewritten to take slab `part` of `parts` of its
    input along axis 1 and give that slab of its output, with the same variables in the
    same order (its weights copied); SpatialError names a layer that cannot be split."""
    whole_shape = tuple(model.input_shape[1:])
    if whole_shape[0] % parts:
        raise SpatialError(f"its input's {whole_shape[0]} planes do not divide into "
                           f"{parts} slabs")
    planes = whole_shape[0] // parts
    for layer, shape in _layers_and_input_shapes(model):
        if shape[1] % parts:
            raise _refused(layer, f"takes {shape[1]} planes, which do not divide into "
                                  f"{parts} slabs")
        check_layer(layer, (shape[1] // parts, *shape[2:]))

    def slab_layer(layer):
        if isinstance(layer, Level):
            return Level([slab_layer(inner) for inner in layer.inner], layer.recompute,
                         name=layer.name)
        config = layer.get_config()
        # a convolution that reads one plane along axis 1 computes its slab as it is: `valid`
        # or `same` with a stride that divides the slab starts each slab at a stride multiple
        if isinstance(layer, _CONVOLUTIONS) and not isinstance(layer, _TRANSPOSED) and (
                _planes_spanned(layer) > 1):
            return _halo_convolution(type(layer))(part=part, parts=parts,
                                                  process_set=process_set, **config)
        if isinstance(layer, keras.layers.BatchNormalization) and not isinstance(
                layer, hvd_tensorflow.SyncBatchNormalization):
            return GroupBatchNormalization(process_set=process_set, group_size=parts,
                                           **{**config, "fused": False})
        if isinstance(layer, keras.layers.Rescaling) and getattr(
                layer.scale, "shape", ())[:1] == (whole_shape[0],):  # the input's own
            rows = slice(part * planes, (part + 1) * planes)
            return keras.layers.Rescaling(layer.scale[rows], layer.offset[rows],
                                          dtype=layer.dtype_policy, name=layer.name)
        return layer.__class__.from_config(config)

    inputs = keras.Input((planes, *whole_shape[1:]), dtype=model.inputs[0].dtype)
    split = keras.models.clone_model(model, input_tensors=inputs, clone_function=slab_layer)
    split.set_weights(model.get_weights())
    return split
