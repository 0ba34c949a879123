"""The tf.data pipeline, given rank and size as arguments (no Horovod involved)."""
import numpy as np
import pytest
import tensorflow as tf

import input_pipeline
from input_pipeline import sources


def indexed_source(num_examples, files=()):
    """Examples whose feature is their own index, to see exactly who got what."""
    indices = np.arange(num_examples, dtype="int64")
    return sources.Source("indexed", num_examples, (), 1, records=lambda:
                          tf.data.Dataset.from_tensor_slices((indices, indices)))


def epoch_of(dataset, steps):
    return np.concatenate([features.numpy() for features, _ in dataset.take(steps)])


@pytest.mark.parametrize("deterministic", [False, True])
def test_ranks_see_disjoint_parts_that_make_the_whole_split(deterministic):
    size, batch, num_examples = 2, 8, 64
    steps = num_examples // (size * batch)
    seen = [epoch_of(input_pipeline.training_dataset(
        indexed_source(num_examples), rank=rank, size=size, batch_size=batch,
        steps_per_epoch=steps, seed=1, deterministic=deterministic), steps)
        for rank in range(size)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(num_examples))


def test_uneven_shards_still_give_every_rank_the_same_number_of_steps():
    size, batch = 3, 4
    source = indexed_source(50)  # shards of 17, 17 and 16 examples
    for rank in range(size):
        dataset = input_pipeline.training_dataset(source, rank=rank, size=size, batch_size=batch,
                                                  steps_per_epoch=4, seed=0)
        assert len(epoch_of(dataset, 40)) == 40 * batch  # repeats, never runs out


def test_each_epoch_is_reshuffled_with_a_seed():
    def two_epochs(seed):
        dataset = input_pipeline.training_dataset(indexed_source(32), rank=0, size=1,
                                                  batch_size=32, steps_per_epoch=1, seed=seed)
        return epoch_of(dataset, 2).reshape(2, 32)
    first, second = two_epochs(seed=7)
    assert sorted(first) == sorted(second) == list(range(32))
    assert list(first) != list(second)
    np.testing.assert_array_equal(two_epochs(seed=7), two_epochs(seed=7))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("first_step", [0, 2])
def test_a_pipeline_started_at_step_s_of_epoch_k_continues_one_started_at_0(deterministic,
                                                                            first_step):
    def stream(first_epoch, first_step, steps):
        dataset = input_pipeline.training_dataset(
            indexed_source(40), rank=1, size=2, batch_size=4, steps_per_epoch=5, seed=9,
            first_epoch=first_epoch, first_step=first_step, deterministic=deterministic)
        return epoch_of(dataset, steps)
    resumed = stream(3, first_step, 10 - first_step)
    np.testing.assert_array_equal(resumed, stream(0, 0, 25)[(15 + first_step) * 4:])


def test_deterministic_global_batches_do_not_depend_on_the_number_of_processes():
    global_batch, steps = 16, 12  # three epochs of 64 examples

    def global_batches(size):
        per_rank = [epoch_of(input_pipeline.training_dataset(
            indexed_source(64), rank=rank, size=size, batch_size=global_batch // size,
            steps_per_epoch=4, seed=3, deterministic=True), steps).reshape(steps, -1)
            for rank in range(size)]
        return np.concatenate(per_rank, axis=1)
    one = global_batches(1)
    for size in (2, 4):
        np.testing.assert_array_equal(global_batches(size), one)


def test_evaluation_shards_are_disjoint_and_complete_with_a_partial_last_batch():
    seen = [np.concatenate([f.numpy() for f, _ in input_pipeline.evaluation_dataset(
        indexed_source(45), rank=rank, size=2, batch_size=8)]) for rank in (0, 1)]
    assert sorted(np.concatenate(seen)) == list(range(45))


def test_digits_split_is_fixed_and_scaled():
    train, validation = input_pipeline.load("digits", "train"), input_pipeline.load(
        "digits", "validation")
    assert (train.num_examples, validation.num_examples) == (1437, 360)
    assert train.feature_shape == (8, 8, 1) and train.num_outputs == 10
    images = np.stack([x.numpy() for x, _ in train.all_records().take(100)])
    assert 0.0 <= images.min() and images.max() <= 1.0
    again = input_pipeline.load("digits", "train")
    first = next(iter(train.all_records()))[0].numpy()
    np.testing.assert_array_equal(first, next(iter(again.all_records()))[0].numpy())


def test_the_digits_kept_in_the_users_cache_are_scikit_learns_split(tmp_path, monkeypatch):
    """The split read back from the cache, from a cache file cut short, and where the cache
    cannot be written, is scikit-learn's stratified split itself."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    expected = train_test_split((data.images / 16.0).astype("float32")[..., np.newaxis],
                                data.target.astype("int64"), test_size=0.2, random_state=0,
                                stratify=data.target)

    def loaded():
        arrays = [sources.digits(split).all_records().batch(2000).get_single_element()
                  for split in ("train", "validation")]
        return [arrays[0][0], arrays[1][0], arrays[0][1], arrays[1][1]]

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for attempt in ("made", "read back", "cut short"):
        for found, wanted in zip(loaded(), expected):
            np.testing.assert_array_equal(found.numpy(), wanted, err_msg=attempt)
        [kept] = (tmp_path / "hvd-keras").glob("digits-*.npz")
        if attempt == "made":
            written = kept.stat().st_mtime_ns
        if attempt == "read back":
            assert kept.stat().st_mtime_ns == written  # read, not made again
            kept.write_bytes(kept.read_bytes()[:1000])
    assert len(kept.read_bytes()) > 1000  # made again whole
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    for found, wanted in zip(loaded(), expected):
        np.testing.assert_array_equal(found.numpy(), wanted)


def test_synthetic_images_have_the_asked_shape_and_are_reproducible():
    source = input_pipeline.load("synthetic", "train", image_size=32)
    dataset = input_pipeline.training_dataset(source, rank=0, size=1, batch_size=4,
                                              steps_per_epoch=2, seed=0)
    images, labels = next(iter(dataset))
    assert images.shape == (4, 32, 32, 3) and labels.shape == (4,)
    np.testing.assert_array_equal(source.decode(5)[0], source.decode(5)[0])


def test_file_cache_is_one_per_rank(tmp_path):
    prefix = str(tmp_path / "cache")
    for rank in (0, 1):
        dataset = input_pipeline.training_dataset(indexed_source(16), rank=rank, size=2,
                                                  batch_size=4, steps_per_epoch=2, seed=0,
                                                  cache=prefix)
        epoch_of(dataset, 4)
    assert {p.name.split(".")[2] for p in tmp_path.glob("cache.indexed.*.index")} == {
        "0-of-2", "1-of-2"}


def test_tfrecords_round_trip_the_digits(digits_tfrecords):
    original = input_pipeline.load("digits", "validation")
    shards = sources.tfrecord_images("validation", str(digits_tfrecords), 8, channels=1,
                                     num_outputs=10)
    assert len(shards.files) == 4 and shards.num_examples == original.num_examples
    decoded = shards.all_records().map(shards.decode)
    for (image, label), (expected_image, expected_label) in zip(
            decoded.take(20), original.all_records().take(20)):
        assert int(label) == int(expected_label)
        np.testing.assert_allclose(image.numpy()[..., 0], expected_image.numpy()[..., 0],
                                   atol=1 / 255)


def test_tfrecords_are_sharded_by_file_with_enough_files(digits_tfrecords):
    source = input_pipeline.load("imagenet", "validation", data_dir=str(digits_tfrecords),
                                 image_size=8)
    assert input_pipeline.shard_by_file(source, 2)
    assert not input_pipeline.shard_by_file(source, 5)
    labels = [np.concatenate([y.numpy() for _, y in input_pipeline.evaluation_dataset(
        source, rank=rank, size=2, batch_size=16)]) for rank in (0, 1)]
    expected = [y for _, y in source.all_records().map(source.decode).as_numpy_iterator()]
    assert sum(map(len, labels)) == source.num_examples
    # Rank 0 reads files 0 and 2 and rank 1 files 1 and 3, by file.
    assert sorted(np.concatenate(labels)) == sorted(expected)
    assert len(labels[0]) == 90 + 90 and len(labels[1]) == 90 + 90


def test_a_pattern_without_files_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="validation-"):
        input_pipeline.load("imagenet", "validation", data_dir=str(tmp_path), image_size=8)


def test_tfds_sources_read_prepared_data_and_say_how_to_prepare_missing_data(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=12):
        source = input_pipeline.load("cifar10", "train", data_dir=str(tmp_path))
        image, label = next(iter(input_pipeline.training_dataset(
            source, rank=0, size=1, batch_size=4, steps_per_epoch=3, seed=0)))
    assert source.num_examples == 12 and source.num_outputs == 10
    assert image.shape == (4, 32, 32, 3) and float(tf.reduce_max(image)) <= 1.0
    with pytest.raises(FileNotFoundError, match="download_and_prepare"):
        input_pipeline.load("fashion_mnist", "train", data_dir=str(tmp_path))
