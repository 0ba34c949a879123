"""app.train with TensorFlow Datasets mocked (tfds.testing.mock_data): the TFDS experiments
run their real code on generated examples, with no data prepared and no network."""
import app.horovod  # noqa: F401  (first: sets TF_XLA_FLAGS)
import tensorflow_datasets as tfds

from app import train

with tfds.testing.mock_data(num_examples=64):
    train.run()
