"""app.studies.curvature_placements: the bytes it reads from Horovod's timeline for each of
K-FAC's placements are the tensors K-FAC sends, counted by hand from the digits CNN's
layers; a table of every configuration."""
import pytest

from conftest import run_study

MB = 2 ** 20
# The digits CNN's K-FAC layers (8x8x1 images): A's order (the kernel's rows, a 1 for the
# bias) and G's (the outputs): two 3x3 convolutions, the hidden Dense layer on 4x4x64, the
# classifier
LAYERS = [(3 * 3 * 1 + 1, 32), (3 * 3 * 32 + 1, 64), (4 * 4 * 64 + 1, 128), (128 + 1, 10)]
STEPS = 4


@pytest.mark.distributed
def test_each_placement_sends_what_k_fac_sends(tmp_path):
    _, rows = run_study(tmp_path, "app.studies.curvature_placements", "curvature_placements.csv",
                        "-np", "2", "--grad_workers=2,1", f"--steps={STEPS}", "--warmup_steps=1",
                        "--repeats=1", "--flagfile=configs/digits_cnn.cfg",
                        "--batch_size=16", "--threads_per_process=1")
    found = {row["configuration"]: row for row in rows}
    assert list(found) == ["base optimizer", "K-FAC, all gradient workers",
                           "K-FAC, 1 gradient workers", "Shampoo"]

    def sent(row, kind):  # bytes over the run
        return float(row[f"{kind}_mb_per_step"]) * MB * STEPS
    weights = 4 * sum(a * g for a, g in LAYERS)  # float32 gradients: every weight is a layer's
    factors = 4 * sum(a * a + g * g for a, g in LAYERS)  # every step (--kfac_factor_steps=1)
    decompositions = 4 * sum(n + n * n for layer in LAYERS for n in layer)  # at step 0 only
    comm_optimal, memory_optimal = (found["K-FAC, all gradient workers"],
                                    found["K-FAC, 1 gradient workers"])
    assert sent(comm_optimal, "factor") == pytest.approx(STEPS * factors)
    assert sent(comm_optimal, "decomposition") == pytest.approx(decompositions)
    assert sent(comm_optimal, "preconditioned") == 0
    # one gradient worker a layer: its decompositions stay on it; the preconditioned
    # gradients are summed over the ranks instead, every step
    assert sent(memory_optimal, "factor") == pytest.approx(STEPS * factors)
    assert sent(memory_optimal, "decomposition") == 0
    assert sent(memory_optimal, "preconditioned") == pytest.approx(STEPS * weights)
    for row in rows:  # every configuration allreduces the gradients (and epoch-end metrics)
        assert STEPS * weights <= sent(row, "gradient") < STEPS * weights * 1.01
        assert float(row["ms_per_step"]) > 0 and float(row["state_elements_per_rank"]) > 0
    assert float(memory_optimal["state_elements_per_rank"]) < float(
        comm_optimal["state_elements_per_rank"])
    assert sent(found["base optimizer"], "factor") == sent(found["Shampoo"], "factor") == 0
