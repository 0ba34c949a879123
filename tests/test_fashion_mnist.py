"""Fashion-MNIST from Debian's dataset-fashion-mnist: the IDX reader on the package's own
files, and damaged or missing copies rejected with one line naming the file."""
import gzip
import shutil

import numpy as np
import pytest

import input_pipeline
from conftest import error_lines, run, train_command
from input_pipeline import sources

IMAGES, LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"


@pytest.mark.parametrize("split, count", [("train", 60_000), ("validation", 10_000)])
def test_the_package_files_hold_the_whole_data_set(split, count):
    source = input_pipeline.load("fashion_mnist", split)
    assert (source.num_examples, source.feature_shape, source.num_outputs) == (
        count, (28, 28, 1), 10)
    images, labels = zip(*source.all_records().map(source.decode).batch(count))
    images, labels = images[0].numpy(), labels[0].numpy()
    assert images.shape == (count, 28, 28, 1) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images of each of 10 classes.
    np.testing.assert_array_equal(np.bincount(labels), [count // 10] * 10)


@pytest.fixture
def idx_copy(tmp_path):
    """A copy of the package's training files, to damage."""
    for name in (IMAGES, LABELS):
        shutil.copy(f"{sources.DEBIAN_FASHION_MNIST}/{name}", tmp_path / name)
    return tmp_path


def truncated_gzip(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def short_data(path):
    with gzip.open(path, "rb") as idx:
        data = idx.read()
    with gzip.open(path, "wb") as idx:
        idx.write(data[:-28 * 28])


def labels_as_images(path):
    shutil.copy(path.parent / LABELS, path)


@pytest.mark.parametrize("damage, reason", [
    (truncated_gzip, "not a complete gzip file"),
    (short_data, "bytes of data for shape (60000, 28, 28)"),
    (labels_as_images, "is not that of uint8 data of shape (60000, 28, 28)"),
    (lambda path: path.unlink(), "not found; install Debian's dataset-fashion-mnist"),
])
def test_a_damaged_or_missing_file_is_named_with_the_reason(damage, reason, idx_copy):
    damage(idx_copy / IMAGES)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        sources.fashion_mnist_idx("train", str(idx_copy))
    assert str(idx_copy / IMAGES) in str(error.value) and reason in str(error.value)


def test_train_names_a_damaged_idx_file_in_one_line_and_writes_nothing(idx_copy, tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(f"{sources.DEBIAN_FASHION_MNIST}/{name}", idx_copy / name)
    truncated_gzip(idx_copy / IMAGES)
    result = run(train_command("--flagfile=configs/fashion_mnist_cnn.cfg",
                               f"--data_dir={idx_copy}", f"--model_dir={tmp_path / 'run'}"),
                 check=False)
    assert result.returncode == 2
    errors = error_lines(result)
    assert len(errors) == 1 and f"{idx_copy / IMAGES}: not a complete gzip file" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
