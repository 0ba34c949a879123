"""The ImageNet recipe's image preprocessing (Szegedy et al.'s scale and aspect augmentation,
as the TF Model Garden, NVIDIA's DeepLearningExamples and Goyal et al. train ResNet-50).

Training: a random crop of 8% to 100% of the image's area with an aspect ratio between 3/4
and 4/3, decoded alone (a JPEG's other blocks are never decoded), flipped at random, resized
to the model's input. Evaluation: the center crop that resizing the shorter side to 256 and
cropping 224 would take (0.875 of the shorter side, whatever the input size), resized to the
model's input. Both give float pixels in [0, 255]: the model's first layer normalizes each
channel by ImageNet's mean and standard deviation (`input_scaling`), on the accelerator, as
NVIDIA's DALI pipelines do, so that the host's cores only decode, crop and resize. Images that
are not JPEG (PNG, ...) are decoded whole, then cropped.

`jpeg`: True when every image is a JPEG, False when none need be, None to choose per image
(a tf.cond in every image's preprocessing; its cost: BENCHMARKS.md).
"""
import tensorflow as tf

AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_PADDING = 32  # evaluation: 224 of 256, the crop fraction 0.875
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)


def training_image(image_bytes, image_size, channels, seed, jpeg=None):
    """A randomly cropped, resized and flipped float32 image in [0, 255]; the randomness is
    that of `seed` (shape [2]), so the same seed makes the same image."""
    crop_seed, flip_bits = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = _resized(_decode_window(image_bytes, channels,
                                    lambda shape: training_window(shape, crop_seed), jpeg),
                     image_size, channels)
    # The flip's coin is a bit the split drew anyway, and the flip comes after the resize
    # (they commute), where TensorFlow's reverse is cheaper than on the uint8 crop.
    return tf.cond(flip_bits[0] % 2 == 1, lambda: tf.reverse(image, [1]), lambda: image)


def training_window(shape, seed):
    """A random [offset_y, offset_x, height, width] of an image of `shape`: area and aspect
    ratio within their ranges, or the whole image when 10 tries found none that fits."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
        min_object_covered=AREA_RANGE[0], aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE, max_attempts=10, use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def evaluation_image(image_bytes, image_size, channels=3, jpeg=None):
    """The center crop of 0.875 of the shorter side, resized, in [0, 255]; deterministic."""
    return _resized(
        _decode_window(image_bytes, channels, lambda shape: center_window(shape, image_size),
                       jpeg),
        image_size, channels)


def center_window(shape, image_size):
    """[offset_y, offset_x, height, width] of the evaluation's centered square crop."""
    height, width = shape[0], shape[1]
    side = tf.cast(image_size / (image_size + CROP_PADDING)
                   * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def input_scaling(channels):
    """(scale, offset) per channel that take [0, 255] pixels to zero mean and unit variance
    (ImageNet's statistics; their averages for images that are not RGB): the model's first
    layer, keras.layers.Rescaling(scale, offset)."""
    mean, stddev = ((MEAN_RGB, STDDEV_RGB) if channels == 3
                    else ([sum(MEAN_RGB) / 3] * channels, [sum(STDDEV_RGB) / 3] * channels))
    return ([1 / (255 * s) for s in stddev], [-m / s for m, s in zip(mean, stddev)])


def _decode_window(image_bytes, channels, window_of_shape, jpeg):
    """The window [y, x, height, width] = window_of_shape(image shape) of the encoded image,
    as uint8: JPEG decodes only the window, other formats decode whole and are cropped."""
    def decode_jpeg():
        window = window_of_shape(tf.image.extract_jpeg_shape(image_bytes))
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=channels)

    def other():
        image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
        window = window_of_shape(tf.shape(image))
        return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])
    if jpeg is None:
        return tf.cond(tf.io.is_jpeg(image_bytes), decode_jpeg, other)
    return decode_jpeg() if jpeg else other()


def _resized(image, image_size, channels):
    # The cast first: TensorFlow's bilinear resize gives the same bits for uint8 and float
    # input, faster on float (BENCHMARKS.md).
    image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size])
    return tf.ensure_shape(image, [image_size, image_size, channels])
