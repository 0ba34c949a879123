"""app.arithmetic: the batch and learning-rate arithmetic as pure functions, with no flags
parsed and no TensorFlow."""
import pytest

from app import arithmetic
from app.arithmetic import BatchRequest, FlagError


def test_the_global_batch_is_the_batch_times_processes_times_accumulation():
    assert arithmetic.batch_sizes(BatchRequest(batch_size=32), 4) == (32, 128)
    assert arithmetic.batch_sizes(BatchRequest(batch_size=32, accumulation_steps=2), 4) == (
        32, 256)
    assert arithmetic.batch_sizes(BatchRequest(global_batch_size=128), 4) == (32, 128)
    assert arithmetic.batch_sizes(BatchRequest(global_batch_size=128, accumulation_steps=2),
                                  4) == (16, 128)


def test_a_resumed_run_keeps_its_global_batch_at_any_number_of_processes():
    request = BatchRequest(batch_size=32)
    assert arithmetic.batch_sizes(request, 1, resumed=("runs/a", 64)) == (64, 64)
    assert arithmetic.batch_sizes(request, 4, resumed=("runs/a", 64)) == (16, 64)
    with pytest.raises(FlagError, match=r"^--model_dir=runs/a: the global batch of 64 is not "
                                        r"divisible by 3 processes$"):
        arithmetic.batch_sizes(request, 3, resumed=("runs/a", 64))


@pytest.mark.parametrize("request_, world_size, message", [
    (BatchRequest(), 1, "--batch_size=None: give exactly one of --batch_size and "
                        "--global_batch_size"),
    (BatchRequest(16, 64), 1, "--global_batch_size=64: give exactly one of"),
    (BatchRequest(global_batch_size=33), 2, "--global_batch_size=33: the global batch of 33 is "
                                            "not divisible by 2 processes"),
    (BatchRequest(global_batch_size=64, accumulation_steps=3), 2,
     "--global_batch_size=64: the global batch of 64 is not divisible by 2 processes x 3 "
     "accumulation steps"),
])
def test_batches_that_cannot_run_name_their_flag(request_, world_size, message):
    with pytest.raises(FlagError) as error:
        arithmetic.batch_sizes(request_, world_size)
    assert str(error.value).startswith(message)


def test_an_epoch_is_one_pass_at_the_global_batch_unless_steps_are_given():
    request = BatchRequest(batch_size=32)
    assert arithmetic.steps_per_epoch(request, 1437, 64) == 22
    assert arithmetic.steps_per_epoch(request, 1437, 64, steps=5) == 5
    accumulating = BatchRequest(batch_size=16, accumulation_steps=2)
    assert arithmetic.steps_per_epoch(accumulating, 1437, 64) == 44  # 22 updates
    with pytest.raises(FlagError, match=r"^--steps_per_epoch=5: must be a multiple of "
                                        r"--accumulation_steps=2$"):
        arithmetic.steps_per_epoch(accumulating, 1437, 64, steps=5)
    with pytest.raises(FlagError, match=r"^--batch_size=2000: the global batch of 2000 is "
                                        r"larger than the 1437 training examples$"):
        arithmetic.steps_per_epoch(BatchRequest(batch_size=2000), 1437, 2000)


@pytest.mark.parametrize("rule, expected", [("none", 0.1), ("linear", 0.4), ("sqrt", 0.2)])
def test_learning_rate_scales_with_the_global_batch(rule, expected):
    assert arithmetic.scaled_learning_rate(0.1, 256, 64, rule) == pytest.approx(expected)


def test_decay_epochs_are_increasing_epochs_inside_the_training():
    assert arithmetic.decay_epochs(["30", "60", "80"], 90) == [30, 60, 80]
    for values in (["5", "3"], ["0"], ["90"], [], ["3", "3"]):
        with pytest.raises(FlagError, match="must be increasing epochs between 1 and 89"):
            arithmetic.decay_epochs(values, 90)
    with pytest.raises(FlagError, match=r"^--lr_decay_epochs=a,3: must be whole epoch numbers"):
        arithmetic.decay_epochs(["a", "3"], 90)


def test_profile_steps_are_a_start_and_an_end():
    assert arithmetic.profile_steps([]) == ()
    assert arithmetic.profile_steps(["3", "5"]) == (3, 5)
    for values in (["5", "3"], ["0", "2"], ["4"], ["x", "2"]):
        with pytest.raises(FlagError, match="must be two step numbers: START,END"):
            arithmetic.profile_steps(values)
