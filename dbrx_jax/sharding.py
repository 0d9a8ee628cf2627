"""The device mesh, the logical-to-mesh axis rules, and sharded initialisation and data.

Mesh axes:
  data    pure data parallelism: parameters replicated.
  fsdp    data parallelism with parameters and optimizer state sharded (gathered per layer).
  expert  expert parallelism: each device holds E / expert of every layer's experts. Outside
          the MoE it splits the batch too, so no device idles in attention, and it shards the
          other parameters as fsdp does.
  tensor  attention heads and the expert hidden dim F.

The axes are `Auto` (GSPMD propagates shardings from the parameters and the constraints at
block boundaries); the MoE alone runs under `jax.shard_map` (moe/exchange.py). They are passed
explicitly because `jax.make_mesh`'s default axis type changed to `Explicit` in newer JAX.

Nothing here reads an ambient mesh: a model is built for a mesh (`Dbrx(..., mesh=mesh)`), which
`check_mesh` accepts or refuses, and every constraint names it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch dim of activations outside the MoE

# Logical axis name -> mesh axes. One table for parameters and activations.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "layers": None,
    "vocab": "tensor",
    # Parameters' d_model: FSDP shards it, over the expert axis too where that is free (every
    # weight but the experts', which are split over experts there).
    "embed": ("fsdp", "expert"),
    "heads": "tensor",
    "kv_heads": "tensor",
    "qkv": None,
    "head_dim": None,
    "expert": "expert",
    "mlp": "tensor",  # the expert hidden dim F
    "expert_logits": None,
    "seq": None,
    "act_embed": None,  # activations' d_model: whole on every device
    "lora_rank": None,  # an adapter's rank (lora.py): small, never split
}

log = logging.getLogger(__name__)


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with the four axes; `sizes` gives each axis' size
    (missing ones are 1), and at most one may be -1: whatever the others leave."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    free = [i for i, size in enumerate(shape) if size == -1]
    if len(free) > 1 or any(size < 1 and size != -1 for size in shape):
        raise ValueError(f"mesh {dict(sizes)}: sizes must be positive, with at most one -1")
    fixed = int(np.prod([s for s in shape if s != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh {dict(sizes)}: {len(devices)} devices are not a multiple of {fixed}"
            )
        shape[free[0]] = len(devices) // fixed
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs "
            f"{int(np.prod(shape))} devices, there are {len(devices)}"
        )
    grid = device_grid(shape, devices) if devices[0].platform == "tpu" else None
    if grid is None:
        return jax.make_mesh(
            shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
        )
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(shape: list[int], devices: list) -> np.ndarray:
    """TPU devices arranged as a mesh of `shape` (MESH_AXES order) on their physical torus.

    One slice: each mesh axis spans whole physical axes where such a layout exists, so every
    collective runs over full rings with their wraparound links. Where none exists (fsdp=8 x
    expert=8 on a 4x4x4 torus: 8 is no product of whole axes of 4) a physical axis is split
    between two mesh axes, which still compiles and runs, but collectives over those mesh axes
    use partial rings; that is logged with the physical shape, so a mesh of whole axes can be
    chosen instead (benchmarks and `aot_compile.py --sweep` compare them).

    Several slices (devices with distinct `slice_index`): `data` goes over the slices (DCN),
    as data parallelism needs the least bandwidth, and everything else within each slice."""
    sizes = dict(zip(MESH_AXES, shape, strict=True))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        if shape[0] % slices:
            raise ValueError(
                f"mesh {sizes}: the devices form {slices} slices; the data axis (size "
                f"{shape[0]}) spans them over DCN, so it must be a multiple of {slices}"
            )
        ici = [shape[0] // slices, *shape[1:]]
        dcn = [slices] + [1] * (len(shape) - 1)
        per_slice = [d for d in devices if getattr(d, "slice_index", 0) == 0]
        return _lay(
            lambda split: mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, allow_split_physical_axes=split
            ),
            ici,
            per_slice,
        )
    return _lay(
        lambda split: mesh_utils.create_device_mesh(
            shape, devices, allow_split_physical_axes=split
        ),
        shape,
        devices,
    )


def _lay(create, shape: list[int], per_slice: list) -> np.ndarray:
    """`create(split)` on whole physical axes; where that is impossible, again with a physical
    axis split, logged with the torus (of `per_slice`, one slice's devices)."""
    try:
        return create(False)
    except (ValueError, NotImplementedError, AssertionError):
        pass
    torus = np.max([d.coords for d in per_slice], axis=0) + 1
    cores = len(per_slice) // int(np.prod(torus))
    log.warning(
        "mesh %s: no layout puts each axis on whole physical axes of the %s torus%s, so a "
        "physical axis is split between mesh axes (collectives over them use partial rings); "
        "axis sizes that are products of %s avoid it",
        dict(zip(MESH_AXES, shape, strict=True)),
        "x".join(map(str, torus)),
        f" ({cores} devices per chip)" if cores > 1 else "",
        sorted({int(t) for t in torus if t > 1} | ({cores} if cores > 1 else set())),
    )
    return create(True)


def parse_mesh(text: str) -> dict[str, int]:
    """Axis sizes from a flag such as "fsdp=8,expert=8" (for `make_mesh`)."""
    sizes = {}
    for item in text.split(","):
        axis, _, size = item.strip().partition("=")
        try:
            sizes[axis] = int(size)
        except ValueError:
            raise ValueError(
                f"mesh {text!r}: expected axis=size items separated by commas, e.g. "
                f"data=2,expert=4; axes are {MESH_AXES}"
            ) from None
    return sizes


def logical_to_spec(logical_axes, shape=None, axis_sizes: Mapping[str, int] | None = None) -> P:
    """The PartitionSpec of an array with these logical axes. With `shape` and `axis_sizes`
    (e.g. `mesh.shape`), mesh axes of size 1 are dropped, and so is a mesh axis that does not
    divide its dimension (that dimension is then replicated)."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name not in LOGICAL_RULES:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; rules: {sorted(LOGICAL_RULES)}"
            )
        target = LOGICAL_RULES[name]
        axes = () if target is None else (target,) if isinstance(target, str) else target
        axes = tuple(a for a in axes if a not in used)
        if shape is not None and axis_sizes is not None:
            axes = tuple(a for a in axes if axis_sizes[a] > 1)
            while axes and shape[i] % int(np.prod([axis_sizes[a] for a in axes])):
                axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def shard_shape(shape, spec: P, axis_sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The per-device block of an array of `shape` laid out by `spec` on a mesh of these sizes."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        out.append(-(-dim // int(np.prod([axis_sizes[a] for a in axes]))))
    return tuple(out)


def variable_sharding(variable, mesh: Mesh) -> NamedSharding:
    """The NamedSharding of a variable (or plain array) on `mesh` from its `logical_axes`
    metadata; replicated without it (optimizer counters, say)."""
    axes = variable.get_metadata("logical_axes", None) if _is_variable(variable) else None
    value = variable.get_value() if _is_variable(variable) else variable
    if axes is None or len(axes) != len(value.shape):
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh.shape))


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """`variable_sharding` of every variable of `state`."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh), state, is_leaf=_is_variable)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_on(tree, mesh: Mesh | None):
    """`tree`'s arrays (concrete or abstract, plain or in nnx variables) as ShapeDtypeStructs
    carrying their shardings on `mesh` by the logical rules, or on the default device without a
    mesh: the targets to create or restore a state into, whatever mesh it was saved from."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, tree, is_leaf=_is_variable)
    else:
        shardings = param_shardings(tree, mesh)

    def attach(leaf, leaf_sharding):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            return leaf.replace(
                jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=leaf_sharding)
            )
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf_sharding)

    return jax.tree.map(attach, tree, shardings, is_leaf=_is_variable)


def check_mesh(mesh: Mesh) -> Mesh:
    """`mesh` if it has our four axes (as `make_mesh` builds it); a ValueError otherwise, rather
    than a model that quietly runs without expert parallelism or constraints."""
    missing = [axis for axis in MESH_AXES if axis not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"mesh with axes {tuple(mesh.axis_names)}: dbrx_jax needs the axes {MESH_AXES} "
            f"(missing {missing}); build it with dbrx_jax.sharding.make_mesh, e.g. "
            "make_mesh({'data': 2, 'expert': 4})"
        )
    return mesh


def constrain(x: jax.Array, logical_axes, mesh: Mesh | None) -> jax.Array:
    """Pins an activation's sharding on `mesh` by its logical axes (nothing without a mesh)."""
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_module(create, mesh: Mesh):
    """Builds `create()` (an nnx Module) directly into its sharded layout on `mesh`: parameters
    are created by a jitted function whose outputs carry the shardings, so the whole model never
    sits on one device. (`create` builds the module for that mesh: `Dbrx(..., mesh=mesh)`.)"""
    abstract = nnx.eval_shape(create)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh)

    def init():
        return nnx.state(create())

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process' part of the batch (rows split over BATCH_AXES)."""
    out = {}
    for key, local in batch.items():
        spec = P(BATCH_AXES, *([None] * (np.ndim(local) - 1)))
        out[key] = jax.make_array_from_process_local_data(
            NamedSharding(mesh, spec), np.asarray(local)
        )
    return out


def bytes_per_device(state, axis_sizes: Mapping[str, int]) -> int:
    """Bytes of `state` (concrete or abstract variables with `logical_axes`) on one device of a
    mesh with these axis sizes; the mesh need not exist (for planning at full scale)."""
    total = 0
    for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        axes = (
            variable.get_metadata("logical_axes", None)
            if isinstance(variable, nnx.Variable)
            else None
        )
        spec = P() if axes is None else logical_to_spec(axes, value.shape, axis_sizes)
        block = shard_shape(value.shape, spec, axis_sizes)
        total += int(np.prod(block)) * jnp.dtype(value.dtype).itemsize
    return total


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """JAX's multi-controller runtime: explicit flags, or whatever JAX detects from the cluster
    (SLURM, TPU pod metadata, Open MPI, Kubernetes) when they are None. On CPU the collectives
    go over gloo. A single process with no cluster around does nothing."""
    explicit = coordinator_address is not None
    in_cluster = any(
        k in os.environ
        for k in (
            "SLURM_JOB_ID",
            "TPU_WORKER_HOSTNAMES",
            "OMPI_COMM_WORLD_SIZE",
            "JAX_COORDINATOR_ADDRESS",
        )
    )
    if not explicit and not in_cluster:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backends only
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    log.info(
        "process %d of %d, %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
