"""Every name is one entry in one table: a model (models.BUILDERS), a data set
(input_pipeline.DATASETS), an optimizer (app.optimizers.OPTIMIZERS), an experiment
(app.experiments.EXPERIMENTS), a kind of parallelism (app.parallel.kinds.KINDS); the flags'
choices and help come from the tables, and docs/flags.md is what --helpfull prints."""
import os
import re
import textwrap

from conftest import PYTHON, REPO, error_lines, run
from test_packaging import absl_flags

# Registers one throwaway entry in each table, as docs/extending.md shows, then runs
# app.train's flag parsing and check (the experiment check) on the arguments given.
REGISTER_AND_PARSE = textwrap.dedent("""
    import sys
    import absl.app
    import app.horovod
    import input_pipeline, models
    import keras
    from input_pipeline import sources
    from app import experiments, flags as app_flags, optimizers

    models.BUILDERS["tiny_dense"] = models.Builder(
        lambda num_outputs, normalization=None: [lambda x: keras.layers.Dense(
            num_outputs, activation="softmax")(keras.layers.Flatten()(x))],
        "THROWAWAY-MODEL one dense layer")
    input_pipeline.DATASETS["noise"] = input_pipeline.Dataset(
        lambda split, options: sources.synthetic(split, (4, 4, 1), 3, 16, options.seed),
        "THROWAWAY-DATASET random 4x4 images", needs_data_dir="--needs-dir" in sys.argv)
    optimizers.OPTIMIZERS["slow_sgd"] = optimizers.Optimizer(
        lambda lr, momentum, decay: optimizers.build("sgd", lr / 10),
        "THROWAWAY-OPTIMIZER SGD at a tenth of the LR")
    experiments.EXPERIMENTS["noise_dense"] = experiments.Experiment(
        "THROWAWAY-EXPERIMENT a dense layer on noise",
        dict(model="tiny_dense", dataset="noise", optimizer="slow_sgd", batch_size=4,
             learning_rate=0.1, epochs=1))
    app_flags.define_training_flags()
    sys.argv = [arg for arg in sys.argv if arg != "--needs-dir"]
    absl.app.run(lambda _: print({name: app_flags.FLAGS[name].value for name in (
        "experiment", "model", "dataset", "optimizer", "batch_size")}),
        flags_parser=app_flags.parse)  # as app.train runs (--helpfull is absl.app's)
""")


def register_and_parse(*args):
    return run([PYTHON, "-c", REGISTER_AND_PARSE, *args], check=False)


def test_a_registered_entry_is_in_the_flags_the_help_and_the_experiment_check():
    helpfull = register_and_parse("--helpfull")
    for marker in ("THROWAWAY-MODEL", "THROWAWAY-DATASET", "THROWAWAY-OPTIMIZER",
                   "THROWAWAY-EXPERIMENT"):
        assert marker in helpfull.stdout, marker
    for choice in ("noise", "slow_sgd", "noise_dense"):  # enums: among the choices
        assert re.search(rf"<[^>]*\b{choice}\b[^>]*>", helpfull.stdout), choice
    # --model takes a user's model too: the table's names are in its help
    assert "tiny_dense: THROWAWAY-MODEL" in re.sub(r"\s+", " ", helpfull.stdout)

    parsed = register_and_parse("--experiment=noise_dense")
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    assert ("'model': 'tiny_dense', 'dataset': 'noise', 'optimizer': 'slow_sgd', "
            "'batch_size': 4") in parsed.stdout

    refused = register_and_parse("--experiment=noise_dense", "--needs-dir")
    assert refused.returncode == 2
    assert error_lines(refused, "-c") == [
        "-c: error: --data_dir=None: is required by --dataset=noise"], refused.stderr[-2000:]


def test_the_flags_page_is_what_helpfull_prints():
    helpfull = run([PYTHON, "-m", "app.train", "--helpfull"], check=False).stdout
    blocks = _flag_blocks(helpfull)
    with open(os.path.join(REPO, "docs", "flags.md")) as page_file:
        rows = re.findall(r"^\| `--(\w+)` \| (.*?) \| (.*) \|$", page_file.read(), re.M)
    page = {name: (default, text.replace("\\|", "|")) for name, default, text in rows}
    stale = "docs/flags.md is stale: run make flags-page"
    in_helpfull = set().union(*(flags for module, flags in absl_flags(helpfull).items()
                                if module.startswith("app.flags.")))
    assert set(page) == in_helpfull == set(blocks), stale
    for name, (default, text) in page.items():
        assert re.sub(r"\s", "", text) in blocks[name], f"--{name}: {stale}"
        if default:
            assert re.sub(r"\s", "", f"(default: {default.strip('`')})") in blocks[name], (
                f"--{name}: {stale}")


def _flag_blocks(helpfull):
    """{flag: its whole text in --helpfull's sections of app.flags' modules, without white
    space (absl wraps its lines, long choices too)}."""
    found = {}
    for section in re.split(r"\napp\.flags\.\w+:\n", helpfull)[1:]:
        section = re.split(r"\n(?=\S)", section, maxsplit=1)[0]  # up to the next module
        blocks = re.split(r"\n  --(?:\[no\])?", "\n" + section)[1:]
        found.update({block.split(":", 1)[0]: re.sub(r"\s", "", block.split(":", 1)[1])
                      for block in blocks})
    return found


def test_one_kind_of_parallelism_is_chosen_from_the_flags():
    code = textwrap.dedent("""
        import app.horovod
        from app import flags as app_flags
        from app.parallel import kinds
        app_flags.define_training_flags()
        for argv in ([], ["--microbatches=2"], ["--pipeline_stages=2"], ["--recompute"],
                     ["--spatial_parts=2"]):
            app_flags.FLAGS.unparse_flags()
            app_flags.FLAGS(["train", "--flagfile=configs/digits_cnn.cfg", "--model=cnn",
                             *argv])
            kind = kinds.choose(app_flags.FLAGS)
            print(kind.name, kind.replicas(4), kind.place(3, 4))
        print(list(kinds.KINDS))
    """)
    lines = run([PYTHON, "-c", code]).stdout.splitlines()
    assert lines == [
        "data 4 Position(stage=0, stages=1, replica=3, replicas=4, part=0, parts=1)",
        "pipeline 4 Position(stage=0, stages=1, replica=3, replicas=4, part=0, parts=1)",
        "pipeline 2 Position(stage=1, stages=2, replica=1, replicas=2, part=0, parts=1)",
        "pipeline 4 Position(stage=0, stages=1, replica=3, replicas=4, part=0, parts=1)",
        "spatial 2 Position(stage=0, stages=1, replica=1, replicas=2, part=1, parts=2)",
        "['spatial', 'pipeline', 'data']",
    ]
