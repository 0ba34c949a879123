"""Your own images in one folder per class become shards app.train reads
(input_pipeline.to_tfrecord --image_folder, then --dataset=images)."""
import os

import numpy as np
import pytest
from conftest import PYTHON, error_lines, run, train_command

import input_pipeline
from app.horovod import tf

# Each class's images are of one colour, so that a decoded image tells its label.
COLOURS = {"bird": (250, 10, 10), "cat": (10, 250, 10), "dog": (10, 10, 250)}


def write_images(folder, counts, encoding="png", size=(12, 16)):
    """`counts[name]` images of class `name` (its colour) in folder/name/."""
    for name, count in counts.items():
        os.makedirs(folder / name, exist_ok=True)
        for index in range(count):
            image = np.tile(np.array(COLOURS[name], np.uint8), (*size, 1))
            encoded = (tf.io.encode_png(image) if encoding == "png"
                       else tf.io.encode_jpeg(image, quality=95))
            (folder / name / f"{index:03d}.{encoding}").write_bytes(encoded.numpy())


def convert(*args):
    return run([PYTHON, "-m", "input_pipeline.to_tfrecord", *args], check=False)


def labelled_colours(data_dir, split):
    """[(label, mean colour)] of every image of `split` as app.train reads it (the training
    split's before its random crop)."""
    source = input_pipeline.load("images", split, data_dir=str(data_dir), image_size=8)
    found = []
    for image, label in source.all_records().map(source.decode).as_numpy_iterator():
        if isinstance(image, bytes):
            image = tf.io.decode_image(image).numpy()
        found.append((int(label), tuple(np.round(image.mean(axis=(0, 1))).astype(int))))
    return source, found


def closest_class(colour):
    names = sorted(COLOURS)
    return min(range(len(names)),
               key=lambda index: np.abs(np.subtract(COLOURS[names[index]], colour)).sum())


def test_a_folder_of_class_folders_becomes_labelled_shards_split_by_fraction(tmp_path):
    write_images(tmp_path / "photos", {"cat": 4, "dog": 4})
    write_images(tmp_path / "photos", {"bird": 8}, encoding="jpeg")
    result = convert(f"--image_folder={tmp_path / 'photos'}", f"--output_dir={tmp_path / 'out'}",
                     "--validation_fraction=0.25", "--num_shards=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "classes.txt").read_text() == "bird\ncat\ndog\n"
    assert sorted(os.listdir(tmp_path / "out")) == [
        "classes.txt", "train-00000-of-00002", "train-00001-of-00002",
        "validation-00000-of-00002", "validation-00001-of-00002"]
    train, train_images = labelled_colours(tmp_path / "out", "train")
    validation, validation_images = labelled_colours(tmp_path / "out", "validation")
    assert (train.num_examples, validation.num_examples, train.num_outputs) == (12, 4, 3)
    # labels by folder name in sorted order; a quarter of each class held out
    for images in (train_images, validation_images):
        assert all(label == closest_class(colour) for label, colour in images), images
    assert sorted(label for label, _ in validation_images) == [0, 0, 1, 2]
    # the same draw again
    again = convert(f"--image_folder={tmp_path / 'photos'}", f"--output_dir={tmp_path / 'again'}",
                    "--validation_fraction=0.25", "--num_shards=2")
    assert again.returncode == 0
    for name in os.listdir(tmp_path / "out"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_existing_train_and_validation_folders_are_kept_and_app_train_reads_them(tmp_path):
    write_images(tmp_path / "photos" / "train", {"cat": 3, "dog": 5})
    write_images(tmp_path / "photos" / "validation", {"cat": 1, "dog": 2})
    out = tmp_path / "out"
    assert convert(f"--image_folder={tmp_path / 'photos'}", f"--output_dir={out}").returncode == 0
    assert (out / "classes.txt").read_text() == "cat\ndog\n"
    _, validation_images = labelled_colours(out, "validation")
    assert sorted(label for label, _ in validation_images) == [0, 1, 1]
    model_dir = tmp_path / "run"
    run(train_command("--dataset=images", f"--data_dir={out}", "--model=cnn", "--image_size=8",
                      "--batch_size=4", "--epochs=1", "--warmup_epochs=0", "--steps_per_epoch=2",
                      "--learning_rate=0.01", f"--model_dir={model_dir}"))
    assert (model_dir / "results.json").exists()


def test_an_unreadable_image_is_named_in_one_line_and_nothing_is_written(tmp_path):
    write_images(tmp_path / "photos", {"cat": 2, "dog": 2})
    broken = tmp_path / "photos" / "dog" / "zz-broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    out = tmp_path / "out"
    result = convert(f"--image_folder={tmp_path / 'photos'}", f"--output_dir={out}")
    assert result.returncode == 2
    lines = error_lines(result, "input_pipeline.to_tfrecord")
    assert len(lines) == 1 and str(broken) in lines[0], result.stderr[-2000:]
    assert os.listdir(out) == []


@pytest.mark.parametrize("layout, reason", [
    ({}, "no class folders"),
    ({"cat": 2, "dog": 0}, "empty class folders: dog"),
])
def test_a_folder_without_images_per_class_is_refused(tmp_path, layout, reason):
    (tmp_path / "photos").mkdir()
    for name, count in layout.items():
        (tmp_path / "photos" / name).mkdir()
        write_images(tmp_path / "photos", {name: count})
    result = convert(f"--image_folder={tmp_path / 'photos'}", f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 2
    lines = error_lines(result, "input_pipeline.to_tfrecord")
    assert len(lines) == 1 and reason in lines[0], result.stderr[-2000:]
