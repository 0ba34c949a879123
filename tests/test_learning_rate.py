"""LR scaling and the schedules app.train builds from Horovod's callbacks (one process)."""
import math

import numpy as np
import pytest

from app.horovod import hvd, keras, tf
from app import callbacks, optimizers

STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def horovod(horovod_here):
    del horovod_here  # Horovod's callbacks ask hvd.size()


def learning_rates(schedule, epochs=5, warmup_epochs=0, reference_lr=0.4, **kwargs):
    """The LR applied at every step of a run with `schedule`, read at each batch's start."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(hvd.DistributedOptimizer(optimizers.build("momentum", 0.4, 0.9)), "mse")
    seen = []
    recorder = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: seen.append(
            float(model.optimizer.learning_rate.numpy())))
    schedule_callbacks = callbacks.learning_rate_schedule(
        hvd, 0.4, reference_lr=reference_lr, warmup_epochs=warmup_epochs, schedule=schedule,
        epochs=epochs,
        steps_per_epoch=STEPS, **kwargs)
    data = tf.data.Dataset.from_tensors((tf.zeros((2, 1)), tf.zeros((2, 1)))).repeat()
    model.fit(data, epochs=epochs, steps_per_epoch=STEPS, verbose=0,
              callbacks=[*schedule_callbacks, recorder])
    return np.array(seen).reshape(epochs, STEPS)


def test_step_schedule_decays_at_the_given_epochs():
    rates = learning_rates("step", decay_epochs=[2, 4], decay_factor=0.1)
    np.testing.assert_allclose(rates[:, 0], [0.4, 0.4, 0.04, 0.04, 0.004], rtol=1e-6)
    assert (rates == rates[:, :1]).all()  # staircase: constant within an epoch


def test_cosine_schedule_falls_every_step_towards_zero():
    rates = learning_rates("cosine").ravel()
    assert rates[0] == pytest.approx(0.4)
    assert (np.diff(rates) < 0).all() and rates[-1] < 0.4 * 0.01
    assert rates[10] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 10 / 20)), rel=1e-5)


def test_warmup_rises_from_the_reference_lr_to_the_scaled_lr_then_holds_it():
    """Goyal et al.'s warmup from the reference batch's LR (0.1) to the LR scaled to a 4x
    larger global batch (0.4), linear over the steps of one epoch, ending on its last step."""
    rates = learning_rates("constant", warmup_epochs=1, reference_lr=0.1)
    np.testing.assert_allclose(rates[0], [0.175, 0.25, 0.325, 0.4], rtol=1e-6)
    np.testing.assert_allclose(rates[1:], 0.4, rtol=1e-6)


def test_no_warmup_at_the_reference_batch_and_the_schedule_starts_after_its_epochs():
    rates = learning_rates("cosine", warmup_epochs=1, reference_lr=0.4)
    np.testing.assert_allclose(rates[0], 0.4, rtol=1e-6)  # nothing to warm up to
    assert rates[1, 0] == pytest.approx(0.4) and (np.diff(rates[1:].ravel()) < 0).all()


@pytest.mark.parametrize("schedule, options", [
    ("constant", {}), ("cosine", {}), ("step", {"decay_epochs": [3, 4]})])
def test_a_resumed_run_starts_from_the_lr_its_schedule_left_at_the_epoch_before(schedule,
                                                                              options):
    """What app.train sets the optimizer's LR to when it resumes at epoch e: the LR of epoch
    e - 1's last step (warmup, then the schedule), and the scaled LR at epoch 0."""
    rates = learning_rates(schedule, warmup_epochs=2, reference_lr=0.1, **options)
    built = callbacks.learning_rate_schedule(
        hvd, 0.4, reference_lr=0.1, warmup_epochs=2, schedule=schedule, epochs=5,
        steps_per_epoch=STEPS, **options)
    before = [callbacks.learning_rate_before(built, epoch, STEPS, 0.4) for epoch in range(5)]
    np.testing.assert_allclose(before, [0.4, *rates[:-1, -1]], rtol=1e-6)
    assert len(set(np.round(before, 6))) > 1
