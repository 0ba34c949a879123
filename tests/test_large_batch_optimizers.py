"""LARS, LAMB and NovoGrad against NumPy transcriptions of their papers' updates, several
steps each, on a weight matrix (trust ratio and weight decay apply) and a bias (excluded);
the same optimizers wrapped in hvd.DistributedOptimizer; Horovod's momentum correction on
LARS; and the project's momentum SGD in TensorFlow's fused kernel against Keras 3's SGD."""
import numpy as np
import pytest

from app.horovod import hvd, tf  # first: TensorFlow's environment
import keras
from app import large_batch_optimizers as lbo, optimizers
from conftest import mpirun, read_log, run, train_command

STEPS, LR, WD = 5, 0.1, 0.01


def numpy_lars(w, grads, excluded, momentum=0.9, eta=0.001):
    velocity = np.zeros_like(w)
    for g in grads:
        if excluded:
            update = g
        else:
            ratio = np.linalg.norm(w) / (np.linalg.norm(g) + WD * np.linalg.norm(w))
            update = eta * ratio * (g + WD * w)
        velocity = momentum * velocity + LR * update
        w = w - velocity
    return w


def numpy_lamb(w, grads, excluded, beta_1=0.9, beta_2=0.999, epsilon=1e-6):
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        r = (m / (1 - beta_1 ** t)) / (np.sqrt(v / (1 - beta_2 ** t)) + epsilon)
        if not excluded:
            r = r + WD * w
            r = r * np.linalg.norm(w) / np.linalg.norm(r)
        w = w - LR * r
    return w


def numpy_novograd(w, grads, excluded, beta_1=0.95, beta_2=0.98, epsilon=1e-8):
    m, v = np.zeros_like(w), None
    for g in grads:
        squared_norm = np.sum(g * g)
        v = squared_norm if v is None else beta_2 * v + (1 - beta_2) * squared_norm
        update = g / (np.sqrt(v) + epsilon) + (0 if excluded else WD * w)
        m = beta_1 * m + (1 - beta_1) * update
        w = w - LR * m
    return w


CASES = {
    "lars": (lambda: lbo.LARS(LR, momentum=0.9, eta=0.001, weight_decay=WD), numpy_lars),
    "lamb": (lambda: lbo.LAMB(LR, weight_decay=WD), numpy_lamb),
    "novograd": (lambda: lbo.NovoGrad(LR, weight_decay=WD), numpy_novograd),
}


def run_steps(optimizer, start, grads, name):
    """Steps through apply_gradients() (whose apply() is where hvd.DistributedOptimizer
    allreduces on Keras 3) with the gradients of losses whose gradients are `grads`."""
    variable = keras.Variable(start, name=name)
    for g in grads:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.constant(g) * variable)
        optimizer.apply_gradients([(tape.gradient(loss, variable), variable)])
    return variable.numpy()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("variable, excluded", [("kernel", False), ("bias", True)])
def test_several_steps_follow_the_papers_update(name, variable, excluded):
    make, reference = CASES[name]
    rng = np.random.default_rng(0)
    shape = (4, 3) if variable == "kernel" else (3,)
    start = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(scale=0.5, size=shape).astype(np.float32) for _ in range(STEPS)]
    found = run_steps(make(), start, grads, variable)
    expected = reference(start.astype(np.float64), [g.astype(np.float64) for g in grads],
                         excluded)
    np.testing.assert_allclose(found, expected, rtol=2e-5, atol=1e-6)
    assert np.abs(found - start).max() > 1e-4  # the steps moved the weights


@pytest.mark.parametrize("name", sorted(CASES))
def test_horovods_distributed_optimizer_wraps_each_without_changing_its_steps(name, horovod_here):
    del horovod_here
    make, reference = CASES[name]
    rng = np.random.default_rng(1)
    start = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(STEPS)]
    wrapped = hvd.DistributedOptimizer(make())
    assert isinstance(wrapped, type(make()))
    np.testing.assert_allclose(run_steps(wrapped, start, grads, "kernel"),
                               run_steps(make(), start, grads, "kernel"), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_fused_momentum_sgd_steps_as_keras_3s_sgd_to_the_bit(dtype):
    """optimizers.MomentumSGD (ResourceApplyKerasMomentum) against keras.optimizers.SGD,
    five steps with a changing LR, eagerly and compiled alike."""
    rng = np.random.default_rng(2)
    start = rng.normal(size=(4, 3)).astype(dtype)
    grads = [rng.normal(size=(4, 3)).astype(dtype) for _ in range(STEPS)]
    found = []
    for make in (keras.optimizers.SGD, optimizers.MomentumSGD):
        for compiled in (False, True):
            optimizer, weight = make(LR, momentum=0.9), keras.Variable(start, dtype=dtype)
            optimizer.build([weight])
            step = stepper(optimizer, weight)
            step = tf.function(step) if compiled else step
            for index, grad in enumerate(grads):
                optimizer.learning_rate.assign(LR / (index + 1))
                step(tf.constant(grad))
            found.append(weight.numpy())
    assert not np.array_equal(found[0], start)
    for other in found[1:]:
        np.testing.assert_array_equal(other, found[0])


def stepper(optimizer, weight):
    """A function of a gradient that steps `weight` (captured: a tf.function's arguments
    would be tensors, which the optimizer does not know)."""
    def step(grad):
        optimizer.apply([grad], [weight])
    return step


def test_a_zero_weight_gets_a_trust_ratio_of_one():
    optimizer = lbo.LARS(LR, momentum=0.0, eta=1.0)
    found = run_steps(optimizer, np.zeros((2, 2), np.float32), [np.ones((2, 2), np.float32)],
                      "kernel")
    np.testing.assert_allclose(found, -LR * np.ones((2, 2)))


def test_horovods_momentum_correction_scales_the_lars_velocity(horovod_here):
    """On Keras 3 Horovod's LR callbacks correct the momentum by scaling the optimizer's
    `momentums` by new LR / old LR: LARS's velocities, which hold LR-scaled steps."""
    del horovod_here
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(lbo.LARS(LR, momentum=0.9), "mse")
    model.fit(np.ones((4, 3)), np.zeros((4, 2)), verbose=0)  # one step: nonzero velocities
    velocities = [velocity.numpy() for velocity in model.optimizer.momentums]
    assert all(np.abs(velocity).max() > 0 for velocity in velocities)
    halving = hvd.callbacks.LearningRateScheduleCallback(initial_lr=LR, multiplier=0.5)
    halving.set_model(model)
    halving.on_train_begin()
    halving.on_epoch_begin(1)
    halving.on_batch_begin(0)
    np.testing.assert_allclose(model.optimizer.learning_rate.numpy(), LR / 2)
    for velocity, before in zip(model.optimizer.momentums, velocities, strict=True):
        np.testing.assert_allclose(velocity.numpy(), before / 2)


@pytest.mark.distributed
@pytest.mark.parametrize("name, learning_rate", [("lars", 2.0), ("lamb", 0.02),
                                                 ("novograd", 0.05)])
def test_each_trains_the_cnn_on_two_processes(name, learning_rate, tmp_path):
    run([*mpirun(2), *train_command(
        "--flagfile=configs/digits_cnn.cfg", f"--optimizer={name}",
        f"--learning_rate={learning_rate}", "--weight_decay=1e-4", "--epochs=4",
        f"--model_dir={tmp_path}")])
    log = read_log(tmp_path)
    assert float(log[-1]["loss"]) < 0.5 * float(log[0]["loss"])
    assert float(log[-1]["val_accuracy"]) > 0.8
