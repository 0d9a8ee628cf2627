"""The training state, (params, opt_state) with the model's graphdef: how it is created, where a
run's comes from, and how it leaves as an export. Training (train.py) and the export entry point
both come here, so neither imports the other.

A run's workdir holds `config.json` (`RunConfig`: the experiment, the model, the tokenizer) and
`checkpoints/<step>/` (io/checkpoint.py), each of which stores the RunConfig it was saved with:
that copy, not config.json, is what a resume is checked against and an export is built from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dbrx_jax import quant, sharding
from dbrx_jax.config import DbrxConfig
from dbrx_jax.io import checkpoint, files
from dbrx_jax.io.pretrained import from_pretrained, load_params
from dbrx_jax.model import Dbrx
from dbrx_jax.optim import make_optimizer
from dbrx_jax.tokenizer import Tokenizer, load_tokenizer, tokenizer_for_checkpoint

log = logging.getLogger(__name__)

RUN_CONFIG = "config.json"
CHECKPOINTS = "checkpoints"


def split_trainable(model: Dbrx) -> tuple[nnx.GraphDef, nnx.State, tuple[nnx.State, ...]]:
    """(graphdef, what trains, what stays frozen): with adapters (`lora_rank` > 0) the adapters
    train and the base is frozen (never differentiated, no optimizer state); without, every
    parameter trains and nothing is frozen. `nnx.merge(graphdef, params, *frozen)` is the
    model."""
    if model.config.lora_rank:
        graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
        return graphdef, adapters, (base,)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, ()


def abstract_train_state(config: DbrxConfig, tx: optax.GradientTransformation, mesh: Mesh):
    """(graphdef, params, opt_state, frozen), the arrays as ShapeDtypeStructs carrying their
    shardings on `mesh`: the targets to restore a checkpoint into, whatever mesh it was saved
    from. `params` is what trains (`split_trainable`)."""
    model = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh))
    graphdef, params, frozen = split_trainable(model)
    opt_state = jax.eval_shape(tx.init, params)
    frozen = tuple(sharding.abstract_on(f, mesh) for f in frozen)
    if config.quant_bits:  # as _frozen_base stores it
        frozen = (_abstract_quantized(frozen[0], config),)
    return (
        graphdef,
        sharding.abstract_on(params, mesh),
        sharding.abstract_on(opt_state, mesh),
        frozen,
    )


def _abstract_quantized(base, config: DbrxConfig):
    """The abstract base quantized as quant.quantize_base stores it: values sharded as their
    weight, scales too except along a contraction axis whose groups do not split evenly."""
    bits, group = config.quant_bits, config.quant_group_size or None
    quantized = jax.eval_shape(lambda b: quant.quantize_base(b, bits, group), base)
    dense = dict(nnx.to_flat_state(base))
    out = []
    for path, variable in nnx.to_flat_state(quantized):
        value, weight = variable.get_value(), dense[path].get_value()
        if isinstance(value, quant.QuantizedWeight):
            mesh, spec = weight.sharding.mesh, list(weight.sharding.spec)
            spec += [None] * (weight.ndim - len(spec))
            axes = spec[value.axis]
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if value.scales.shape[value.axis] % math.prod(mesh.shape[a] for a in names):
                spec[value.axis] = None
            scales = NamedSharding(mesh, P(*spec))
            value = value.replace(
                values=jax.ShapeDtypeStruct(
                    value.values.shape, value.values.dtype, sharding=weight.sharding
                ),
                scales=jax.ShapeDtypeStruct(
                    value.scales.shape, value.scales.dtype, sharding=scales
                ),
            )
        else:
            value = weight
        out.append((path, variable.replace(value)))
    return nnx.from_flat_state(out)


def init_train_state(
    config: DbrxConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int = 0
):
    """(graphdef, params, opt_state, frozen) of a new model for `mesh`, each array created
    directly in its sharded layout (see `split_trainable`)."""
    model = sharding.shard_module(lambda: Dbrx(config, rngs=nnx.Rngs(seed), mesh=mesh), mesh)
    graphdef, params, frozen = split_trainable(model)
    return graphdef, params, init_opt_state(tx, params, mesh), frozen


def init_opt_state(tx: optax.GradientTransformation, params, mesh: Mesh):
    """A fresh optimizer state for `params`, each array created in its sharded layout."""
    opt_shardings = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh)
    return jax.jit(tx.init, out_shardings=opt_shardings)(params)


def initial_state(
    model_config: DbrxConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    checkpointer: checkpoint.Checkpointer | None,
    data_iterator,
    init_from: str = "",
    seed: int = 0,
    run_config: RunConfig | None = None,
):
    """(graphdef, first step, params, opt_state, frozen) of a run: its latest checkpoint that
    restores (`data_iterator` moves to where it was), else `init_from`'s parameters with a new
    optimizer, else a new model. Checkpoints are checked against `run_config` (else
    `model_config`'s architecture) and the state this run makes; a checkpoint that does not fit,
    or cannot be read, raises (checkpoint.Checkpointer.restore_latest), and with checkpoints
    present but none restoring the run never starts over.

    With adapters (`lora_rank` > 0) what trains, and all a checkpoint holds, is the adapters and
    their optimizer state; the frozen base is `init_from`'s parameters (else the seed's new
    model), loaded again on every resume."""
    graphdef, abstract_params, abstract_opt, abstract_frozen = abstract_train_state(
        model_config, tx, mesh
    )
    if abstract_frozen:
        frozen = _frozen_base(model_config, mesh, init_from, seed)
        init_from = ""  # the base's source; the adapters start fresh
    else:
        frozen = ()
    if checkpointer is not None and checkpointer.steps():
        expected = (
            run_config.to_json_dict()
            if run_config is not None
            else {"architecture": model_config.architecture()}
        )
        abstract = {"params": abstract_params, "opt_state": abstract_opt}
        step, state = checkpointer.restore_latest(abstract, data_iterator, expected)
        if step is not None:
            log.info("resumed from %s/%d", checkpointer.directory, step)
            return graphdef, step, state["params"], state["opt_state"], frozen
    if init_from:
        params = load_params(init_from, model_config, abstract_params)
        log.info("parameters from %s, a new optimizer state", init_from)
        return graphdef, 0, params, init_opt_state(tx, params, mesh), frozen
    if abstract_frozen:  # new adapters only: the base init is left out of the program
        params = _sharded_init(
            lambda: split_trainable(Dbrx(model_config, rngs=nnx.Rngs(seed), mesh=mesh))[1],
            abstract_params,
        )
        return graphdef, 0, params, init_opt_state(tx, params, mesh), frozen
    graphdef, params, opt_state, _ = init_train_state(model_config, tx, mesh, seed)
    return graphdef, 0, params, opt_state, frozen


def _sharded_init(create, abstract):
    return jax.jit(create, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))()


def _frozen_base(config: DbrxConfig, mesh: Mesh, init_from: str, seed: int):
    """The frozen base of an adapter run: `init_from`'s parameters, or the seed's new model's
    (the same on every resume); with `quant_bits`, its block matrices quantized (QLoRA)."""
    model = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh))
    abstract_base = sharding.abstract_on(split_trainable(model)[2][0], mesh)  # unquantized
    if init_from:
        log.info("frozen base from %s", init_from)
        plain = config.replace(lora_rank=0, quant_bits=0, quant_group_size=0)
        base = load_params(init_from, plain, abstract_base)
    else:
        log.info(
            "frozen base: a new model (seed %d); give config.init_from to adapt a trained one",
            seed,
        )
        base = _sharded_init(
            lambda: split_trainable(Dbrx(config, rngs=nnx.Rngs(seed), mesh=mesh))[2][0],
            abstract_base,
        )
    if config.quant_bits:
        log.info(
            "frozen base: block matrices at %d bits, %s",
            config.quant_bits,
            f"groups of {config.quant_group_size}" if config.quant_group_size else "per channel",
        )
        base = quant.quantize_base(base, config.quant_bits, config.quant_group_size or None)
    return (base,)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a run records of itself (`workdir/config.json`, and in every checkpoint)."""

    experiment: ml_collections.ConfigDict
    model: DbrxConfig
    tokenizer: str

    def to_json_dict(self) -> dict[str, Any]:
        run = {
            "experiment": self.experiment.to_dict(),
            "model": json.loads(self.model.to_json()),
            "architecture": self.model.architecture(),
            "tokenizer": self.tokenizer,
        }
        return json.loads(json.dumps(run, default=str))  # JSON types only (Orbax stores it)

    def write(self, workdir: str) -> None:
        """workdir/config.json, replaced whole (never left half-written)."""
        if jax.process_index() == 0:
            files.write_json(os.path.join(workdir, RUN_CONFIG), self.to_json_dict())

    @classmethod
    def from_json_dict(cls, run: dict[str, Any]) -> RunConfig:
        return cls(
            experiment=ml_collections.ConfigDict(run["experiment"]),
            model=DbrxConfig.from_dict(run["model"]),
            tokenizer=run.get("tokenizer", ""),
        )

    @classmethod
    def read(cls, workdir: str) -> RunConfig:
        path = os.path.join(workdir, RUN_CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no run config (is {workdir} a training workdir?)")
        run = files.read_json(path, "a training run's config")
        try:
            return cls.from_json_dict(run)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a training run's config ({e!r})") from None


def restore_run(workdir: str, step: int | None = None, mesh: Mesh | None = None):
    """(RunConfig, step, graphdef, params) of a run's checkpoint (the latest, or `step`), as
    saved: the model and optimizer its `config` item records (workdir/config.json only for a
    checkpoint saved without one), so a later run's config.json cannot get in the way. `params`
    is what trained: a LoRA run's adapters alone. `mesh` defaults to every device as data."""
    directory = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory}: no such directory (is {workdir} a training workdir, with "
            f"{RUN_CONFIG} and {CHECKPOINTS}/?)"
        )
    checkpointer = checkpoint.Checkpointer(directory)
    try:
        steps = checkpointer.steps()
        if not steps:
            raise FileNotFoundError(f"{workdir}/{CHECKPOINTS}: no checkpoint to restore")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"{workdir}/{CHECKPOINTS} has no step {step}; its steps: {steps}")
        stored = checkpointer.stored_config(step)
        saved_with = stored is not None and {"experiment", "model"} <= stored.keys()
        run = RunConfig.from_json_dict(stored) if saved_with else RunConfig.read(workdir)
        tx = make_optimizer(run.experiment)
        mesh = sharding.make_mesh({"data": -1}) if mesh is None else mesh
        graphdef, params, opt_state, _ = abstract_train_state(run.model, tx, mesh)
        restored = checkpointer.restore_state(step, {"params": params, "opt_state": opt_state})
    finally:
        checkpointer.close()
    return run, step, graphdef, restored["params"]


def load_adapted(
    workdir: str, base: str = "", step: int | None = None, mesh: Mesh | None = None
) -> Dbrx:
    """A LoRA run's adapters (its latest checkpoint, or `step`) on a base: `base` (an export
    or an HF directory of the same architecture), else the run's own (its `init_from`, else
    its seed's model). Unmerged: `.merge_lora()` folds them in."""
    mesh = sharding.make_mesh({"data": -1}) if mesh is None else mesh
    run, _, graphdef, adapters = restore_run(workdir, step, mesh)
    if not run.model.lora_rank:
        raise ValueError(f"{workdir}: this run has no adapters (lora_rank=0): export it instead")
    source = base or run.experiment.init_from
    frozen = _frozen_base(run.model, mesh, source, run.experiment.seed)
    return nnx.merge(graphdef, adapters, *frozen)


def load_for_inference(
    checkpoint: str,
    adapters: str = "",
    tokenizer: str = "",
    mesh: Mesh | None = None,
    **overrides: Any,
) -> tuple[Dbrx, Tokenizer | None]:
    """A model to generate from or score, with its tokenizer: `checkpoint` (our export or an HF
    directory; `overrides` are DbrxConfig fields, as for `from_pretrained`), or with `adapters`
    (a LoRA run's workdir) that run's adapters on `checkpoint` as the base. The tokenizer is
    `tokenizer` (a `load_tokenizer` spec), else the run's, else the checkpoint's
    (`tokenizer_for_checkpoint`); None when there is none (token ids only)."""
    if adapters:
        if overrides:
            raise ValueError(
                f"{adapters}: a LoRA run is loaded with its own config; cannot override "
                f"{', '.join(sorted(overrides))}"
            )
        model = load_adapted(adapters, base=checkpoint, mesh=mesh)
        tokenizer = tokenizer or RunConfig.read(adapters).tokenizer
    else:
        model = from_pretrained(checkpoint, mesh=mesh, **overrides)  # into its shards
    if tokenizer:
        return model, load_tokenizer(tokenizer)
    return model, tokenizer_for_checkpoint(checkpoint, model.config.vocab_size)


def export_from_workdir(
    workdir: str,
    output: str,
    step: int | None = None,
    *,
    overwrite: bool = False,
    merge_lora: bool = False,
) -> int:
    """Exports the parameters of a run's checkpoint (the latest, or `step`; `restore_run`) for
    `from_pretrained` and `init_from`. Returns the step exported. `output` follows io/files.py's
    rule (checked before anything is read): never inside the checkpoints, an existing export
    replaced only with `overwrite`.

    A LoRA run's checkpoints hold its adapters alone: `merge_lora` folds them into the run's
    frozen base (`load_adapted`) and exports the merged model, which loads anywhere a full
    export does (the converter's HF export included)."""
    inputs = [os.path.join(workdir, CHECKPOINTS), os.path.join(workdir, RUN_CONFIG)]
    files.check_output(output, inputs=inputs, kind=checkpoint.EXPORT_OUTPUT, overwrite=overwrite)
    mesh = sharding.make_mesh({"data": -1})
    run, step, graphdef, params = restore_run(workdir, step, mesh)
    if bool(run.model.lora_rank) != merge_lora:
        raise ValueError(
            f"{workdir}: a LoRA run's checkpoints hold its adapters alone: export it with "
            "--merge_lora (folded into its base)"
            if run.model.lora_rank
            else f"{workdir}: --merge_lora: this run has no adapters (lora_rank=0)"
        )
    config = run.model
    if merge_lora:  # the restored adapters on the run's base
        base = _frozen_base(run.model, mesh, run.experiment.init_from, run.experiment.seed)
        merged = nnx.merge(graphdef, params, *base).merge_lora()
        params, config = nnx.state(merged, nnx.Param), merged.config
        if run.experiment.init_from:
            inputs.append(run.experiment.init_from)
    # A run's own sentencepiece model goes along (not `dbrx` or an `hf:` directory's).
    spm = run.tokenizer if os.path.isfile(run.tokenizer) else None
    if spm is None and run.tokenizer not in ("", "dbrx") and not run.tokenizer.startswith("hf:"):
        log.warning(
            "%s: its tokenizer %s is not there: exported without it", workdir, run.tokenizer
        )
    checkpoint.export_params(
        params, config, output, inputs=inputs, overwrite=overwrite, tokenizer_file=spm
    )
    return step
