"""The ImageNet recipe's preprocessing on a photograph scikit-learn ships (427x640): the
training crops' area and aspect statistics, the evaluation's centered, deterministic crop,
the flips, the normalization by the model's first layer, and the TFRecord files dealt out
anew every epoch and again on resume."""
import numpy as np
import pytest
import keras
import tensorflow as tf

import input_pipeline
import models
from input_pipeline import imagenet_preprocessing as preprocessing


@pytest.fixture(scope="module")
def photograph():
    from sklearn.datasets import load_sample_images
    image = load_sample_images().images[0]
    return image, tf.io.encode_jpeg(image).numpy(), tf.io.encode_png(image).numpy()


def test_training_crops_cover_8_to_100_percent_at_aspect_3_4_to_4_3(photograph):
    image, _, _ = photograph
    height, width = image.shape[:2]
    windows = np.array([preprocessing.training_window(tf.constant(image.shape),
                                                      tf.constant([7, index])).numpy()
                        for index in range(400)])
    whole = (windows[:, 2] == height) & (windows[:, 3] == width)
    crops = windows[~whole]
    assert whole.mean() < 0.1 and len(crops) > 300  # the whole image only when no crop fits
    area = crops[:, 2] * crops[:, 3] / (height * width)
    aspect = crops[:, 3] / crops[:, 2]
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
    assert area.min() < 0.15 and area.max() > 0.6  # the whole range is used
    assert aspect.min() >= 3 / 4 * 0.97 and aspect.max() <= 4 / 3 * 1.03
    assert (crops[:, 0] + crops[:, 2] <= height).all()
    assert (crops[:, 1] + crops[:, 3] <= width).all()
    assert len({tuple(window) for window in crops}) > 0.9 * len(crops)  # not one crop


def test_training_images_have_the_models_input_shape_from_jpeg_and_png(photograph):
    _, jpeg, png = photograph
    for encoded in (jpeg, png):
        image = preprocessing.training_image(tf.constant(encoded), 224, 3, tf.constant([1, 2]))
        assert image.shape == (224, 224, 3) and image.dtype == tf.float32
        assert image.numpy().min() >= 0 and 128 < image.numpy().max() <= 255  # pixels
        again = preprocessing.training_image(tf.constant(encoded), 224, 3, tf.constant([1, 2]))
        np.testing.assert_array_equal(again, image)  # the seed decides the crop and the flip
        # A data set of one format skips the per-image choice, and gets the same image.
        one_format = preprocessing.training_image(tf.constant(encoded), 224, 3,
                                                  tf.constant([1, 2]), jpeg=encoded is jpeg)
        np.testing.assert_array_equal(one_format, image)
    decoded_whole = preprocessing.training_image(tf.constant(jpeg), 224, 3,
                                                 tf.constant([1, 2]), jpeg=False)
    assert np.abs(decoded_whole - preprocessing.training_image(
        tf.constant(jpeg), 224, 3, tf.constant([1, 2])).numpy()).mean() < 3  # of 255
    images = [preprocessing.training_image(tf.constant(jpeg), 224, 3, tf.constant([1, seed]))
              for seed in range(40)]
    flipped = [seed for seed in range(40) if np.array_equal(images[seed],
                                                            _flipped_crop(jpeg, seed))]
    assert 8 < len(flipped) < 32  # about half of the crops are flipped


def test_evaluation_takes_the_same_center_crop_every_time(photograph):
    _, jpeg, png = photograph
    # resize 256 / crop 224 of the shorter side, at any input size
    np.testing.assert_array_equal(preprocessing.center_window([256, 256, 3], 224),
                                  [16, 16, 224, 224])
    np.testing.assert_array_equal(preprocessing.center_window([427, 640, 3], 224),
                                  [27, 134, 373, 373])
    first = preprocessing.evaluation_image(tf.constant(jpeg), 224).numpy()
    np.testing.assert_array_equal(first, preprocessing.evaluation_image(tf.constant(jpeg),
                                                                        224).numpy())
    from_png = preprocessing.evaluation_image(tf.constant(png), 224).numpy()
    assert np.abs(first - from_png).mean() < 3  # the same crop; JPEG's loss apart (of 255)


def _flipped_crop(jpeg, seed):
    """The training image of seed (1, seed), had its coin said "flip"; resized from uint8,
    so that the equality also checks the pipeline's cast before the resize changes no bit."""
    crop_seed = tf.random.experimental.stateless_split(tf.constant([1, seed]), 2)[0]
    window = preprocessing.training_window(tf.image.extract_jpeg_shape(jpeg), crop_seed)
    image = tf.image.resize(tf.image.decode_and_crop_jpeg(jpeg, window, channels=3), [224, 224])
    return tf.reverse(image, [1]).numpy()


def test_the_models_first_layer_normalizes_to_imagenets_mean_zero_and_stddev_one():
    scaling = preprocessing.input_scaling(3)
    model = models.build("resnet20", (4, 4, 3), 10, input_scaling=scaling)
    first_layer = keras.Model(model.input, model.get_layer("input_scaling").output)
    mean_color = 255 * tf.constant(preprocessing.MEAN_RGB, shape=[1, 1, 1, 3]) * tf.ones(
        [2, 4, 4, 3])
    np.testing.assert_allclose(first_layer(mean_color), 0.0, atol=1e-5)
    one_stddev_up = mean_color + 255 * tf.constant(preprocessing.STDDEV_RGB, shape=[1, 1, 1, 3])
    np.testing.assert_allclose(first_layer(one_stddev_up), 1.0, atol=1e-5)
    later_stage = models.build("resnet20", (4, 4, 3), 10, first_block=1, input_scaling=scaling)
    assert "input_scaling" not in [layer.name for layer in later_stage.layers]
    assert input_pipeline.load("digits", "train").input_scaling is None


def epoch_labels(data_dir, rank, size, first_epoch, epochs, steps):
    """The labels rank `rank` trains on, per epoch: with a shuffle buffer of one they follow
    the order of the files the rank was dealt."""
    source = input_pipeline.load("imagenet", "train", data_dir=str(data_dir), image_size=8)
    dataset = input_pipeline.training_dataset(
        source, rank=rank, size=size, batch_size=30, steps_per_epoch=steps, seed=3,
        first_epoch=first_epoch, shuffle_buffer=1)
    labels = np.concatenate([y.numpy() for _, y in dataset.take(epochs * steps)])
    return labels.reshape(epochs, steps * 30)


def test_files_are_dealt_out_anew_every_epoch_and_again_on_resume(digits_tfrecords):
    """4 training files of 359 or 360 digits, 2 ranks: each epoch every rank reads 2 files,
    which change from epoch to epoch; a run resumed at epoch 2 reads what epoch 2 read."""
    steps = 23  # 690 examples, fewer than the two files of a rank hold
    ranks = [epoch_labels(digits_tfrecords, rank, 2, 0, 4, steps) for rank in (0, 1)]
    source = input_pipeline.load("imagenet", "train", data_dir=str(digits_tfrecords),
                                 image_size=8)
    all_labels = np.array([y for _, y in source.all_records().map(source.decode)
                           .as_numpy_iterator()])
    for epoch in range(4):  # disjoint files: together almost the whole split
        together = np.concatenate([ranks[0][epoch], ranks[1][epoch]])
        assert len(together) == 1380
        assert (np.bincount(together, minlength=10) <= np.bincount(all_labels)).all()
    assert len({ranks[0][epoch].tobytes() for epoch in range(4)}) > 1  # dealt anew
    resumed = epoch_labels(digits_tfrecords, 0, 2, 2, 2, steps)
    np.testing.assert_array_equal(resumed, ranks[0][2:])


def global_batches(data_dir, size, first_epoch=0, epochs=2, steps=3, global_batch=16):
    """The augmented global batches of `epochs` epochs on `size` processes, --deterministic."""
    source = input_pipeline.load("imagenet", "train", data_dir=str(data_dir), image_size=8)
    per_rank = [np.stack([images.numpy() for images, _ in input_pipeline.training_dataset(
        source, rank=rank, size=size, batch_size=global_batch // size, steps_per_epoch=steps,
        seed=5, first_epoch=first_epoch, deterministic=True).take(epochs * steps)])
        for rank in range(size)]
    return np.concatenate(per_rank, axis=1)  # [step, global batch, 8, 8, 3]


def test_crops_and_flips_do_not_depend_on_the_number_of_processes_or_a_resume(
        digits_tfrecords):
    one = global_batches(digits_tfrecords, 1)
    np.testing.assert_array_equal(global_batches(digits_tfrecords, 2), one)
    np.testing.assert_array_equal(global_batches(digits_tfrecords, 1, first_epoch=1,
                                                 epochs=1), one[3:])
    assert len({image.tobytes() for image in one.reshape(-1, 8, 8, 3)}) > 0.9 * 6 * 16
