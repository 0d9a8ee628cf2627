"""Convert between the released Hugging Face DBRX weights and our params-only exports,
streaming one tensor (or one expert) at a time.

    python experiments/convert.py --direction=hf_to_jax --input=dbrx-instruct --output=dbrx-jax
    python experiments/convert.py --direction=jax_to_hf --input=dbrx-jax --output=dbrx-hf \
        --dtype=bfloat16
    python experiments/convert.py ... --mesh=fsdp=8,expert=8   # chunked for that mesh's reads
"""

import resource

from absl import app, flags

from dbrx_jax import cli, sharding
from dbrx_jax.io import convert

_DIRECTION = flags.DEFINE_enum(
    "direction", None, ["hf_to_jax", "jax_to_hf"], "Which way.", required=True
)
_INPUT = flags.DEFINE_string("input", None, "Source directory.", required=True)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Target directory (created atomically).", required=True
)
_DTYPE = flags.DEFINE_enum("dtype", "keep", ["keep", "bfloat16", "float32"], "Output dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "hf_to_jax: chunk arrays as one device of this mesh "
    "holds them (e.g. fsdp=8,expert=8); default one expert per chunk.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _DIRECTION.value == "hf_to_jax":
        mesh = sharding.parse_mesh(_MESH.value) if _MESH.value else None
        config = convert.hf_to_jax(
            _INPUT.value,
            _OUTPUT.value,
            dtype=_DTYPE.value,
            overwrite=_OVERWRITE.value,
            mesh_sizes=mesh,
        )
    else:
        config = convert.jax_to_hf(
            _INPUT.value, _OUTPUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value
        )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        f"wrote {_OUTPUT.value} ({config.num_params() / 1e9:.2f}B parameters); "
        f"peak RSS {peak_gb:.2f} GiB"
    )


if __name__ == "__main__":
    cli.run(main)
