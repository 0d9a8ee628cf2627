"""Export a training run's parameters (no optimizer state) for from_pretrained, generation, or
a new run's `init_from`.

    python experiments/export.py --workdir=runs/demo --output=runs/demo-export [--step=550]
    python experiments/export.py --workdir=runs/sft --output=runs/sft-merged --merge_lora

The output is written atomically and never over the run's checkpoints; an existing export is
replaced only with --overwrite (dbrx_jax/io/files.py).
"""

from absl import app, flags

from dbrx_jax import cli, state

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the export.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Which checkpoint (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export at --output.")
_MERGE_LORA = flags.DEFINE_bool(
    "merge_lora", False, "A LoRA run: fold its adapters into its base and export the result."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    step = state.export_from_workdir(
        _WORKDIR.value,
        _OUTPUT.value,
        _STEP.value,
        overwrite=_OVERWRITE.value,
        merge_lora=_MERGE_LORA.value,
    )
    print(f"exported step {step} of {_WORKDIR.value} to {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
