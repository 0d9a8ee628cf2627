"""Compiling the trainer's and the generator's programs for a TPU slice on a host without one,
and what comes back: a report (per-device memory against HBM, FLOPs, collectives, a roofline
bound, compile seconds), an out-of-memory answer, and a sweep over meshes, remat policies and
micro-batch counts, and a search for the smallest slice of a generation that holds a step.

    report = compile_report(experiment_config, parse_target("v5p-128"), step="train")
    print(format_report(report))
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import ml_collections

from dbrx_jax import experiment, sharding
from dbrx_jax.aot import analysis, programs
from dbrx_jax.aot.topology import GiB, Target, slice_targets
from dbrx_jax.model.layers import attention_impl_for
from dbrx_jax.moe.plan import plan_moe

log = logging.getLogger(__name__)


def build_program(
    config: ml_collections.ConfigDict, target: Target, step: str, *, vocab_size: int | None = None
) -> tuple[programs.Program, object]:
    """The program of `step` for `config` (an experiment config: its model, mesh, batch_size and
    seq_len; for decode, seq_len is the cache's context) on `target`'s devices, and its mesh."""
    if step not in programs.STEPS:
        raise ValueError(f"--step={step!r}: expected one of {programs.STEPS}")
    model_config = experiment.model_config(config.model, vocab_size)
    mesh = sharding.make_mesh(dict(config.mesh), devices=target.devices())
    if step == "train":
        experiment.validate(config)
        return programs.train_program(config, model_config, mesh), mesh
    if step == "prefill":
        return programs.prefill_program(model_config, mesh, config.batch_size, config.seq_len), mesh
    return programs.decode_program(model_config, mesh, config.batch_size, config.seq_len), mesh


def compile_report(
    config: ml_collections.ConfigDict, target: Target, step: str = "train", *, built=None
) -> dict[str, object]:
    """Compiles `step` for `target` and reports on it (see the module docstring). A compile
    that runs out of HBM gives a report with `fits: False` and the `out_of_memory` answer.
    `built`: `build_program`'s result for these arguments, if the caller has it already."""
    program, mesh = built or build_program(config, target, step)
    model_config = experiment.model_config(config.model)
    plan = plan_moe(model_config, mesh)  # what the model built for `mesh` holds (cached)
    report: dict[str, object] = {
        "target": target.describe(),
        "step": step,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "model": config.model.preset,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "remat_policy": model_config.remat_policy,
        "grad_accum_steps": config.grad_accum_steps if step == "train" else 1,
        "plan": plan.describe(),
        "attention": attention_impl_for(model_config.attention_impl, plan.platform),
    }
    start = time.perf_counter()
    try:
        compiled = program.fn.lower(*program.args).compile()
    except Exception as e:  # the TPU compiler's out-of-memory error is a JaxRuntimeError
        oom = analysis.out_of_memory(e, program.arg_groups, target)
        if oom is None:
            raise
        report.update(fits=False, out_of_memory=oom, compile_s=time.perf_counter() - start)
        return report
    report["compile_s"] = time.perf_counter() - start
    memory = analysis.memory(compiled, program.arg_groups, target)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    devices = mesh.devices.size
    comms = analysis.collectives(compiled.as_text(), mesh)
    ours = program.model_flops / devices
    xla_flops = float(cost.get("flops", 0.0))
    # XLA's cost analysis counts a loop body once (the scan over layers), so both terms take
    # the larger of its figure and one that holds regardless: our FLOP count, and every
    # argument byte read once.
    hbm_bytes = max(float(cost.get("bytes accessed", 0.0)), memory["arguments"])
    bound = analysis.roofline(max(ours, xla_flops), hbm_bytes, comms, target)
    chip = target.chip
    report.update(
        fits=memory["headroom"] >= 0,
        memory=memory,
        flops={"ours_per_device": ours, "xla_per_device": xla_flops},
        collectives=[
            {
                "kind": c.kind,
                "axes": list(c.axes) if c.axes is not None else None,
                "sites": c.sites,
                "count": c.count,
                "bytes": c.bytes,
            }
            for c in comms
        ],
        roofline=bound,
        mfu_bound=ours * target.devices_per_chip / chip.peak_flops / bound["step_s_bound"]
        if bound["step_s_bound"]
        else None,
        tokens_per_s_bound=program.tokens / bound["step_s_bound"]
        if bound["step_s_bound"]
        else None,
        chip={
            "kind": chip.device_kind,
            "peak_bf16_tflops": chip.peak_flops / 1e12,
            "hbm_gib": chip.hbm_bytes / GiB,
            "hbm_gb_per_s": chip.hbm_bandwidth / 1e9,
            "ici_gb_per_s": chip.ici_bandwidth / 1e9,
            "source": chip.source,
        },
    )
    return report


def _gib(x: float) -> str:
    """Bytes in GiB, or MiB below one GiB (tiny models' figures stay readable)."""
    return f"{x / GiB:8.2f} GiB" if x >= GiB else f"{x / 2**20:8.2f} MiB"


def format_report(report: dict) -> str:
    """The report as the table the command prints."""
    lines = [
        f"{report['step']} step of {report['model']} for {report['target']}",
        f"mesh {report['mesh']}, batch {report['batch_size']} x {report['seq_len']}, "
        f"remat {report['remat_policy']}, micro-batches {report['grad_accum_steps']}; "
        f"compiled in {report['compile_s']:.1f} s",
        f"attention: {report['attention']}; {report['plan']}",
    ]
    if not report["fits"] and "out_of_memory" in report:
        oom = report["out_of_memory"]
        lines += [
            "",
            f"OUT OF MEMORY: needs about {oom['needed'] / GiB:.1f} GiB per device, the device "
            f"has {oom['hbm'] / GiB:.1f} GiB ({oom['message']})",
        ]
        for name, nbytes in oom["arguments"].items():
            lines.append(f"  {name:<24}{_gib(nbytes)}")
        if oom["temporaries"] is not None:
            lines.append(f"  {'temporaries':<24}{_gib(oom['temporaries'])}")
        lines.append("  largest arguments per device:")
        lines += [f"    {_gib(n)}  {path} {shape}" for path, shape, n in oom["largest_arguments"]]
        lines += ["", "What to change: " + "; ".join(_advice(report))]
        return "\n".join(lines)
    memory = report["memory"]
    lines += ["", "per device:"]
    for name, value in memory.items():
        if name not in ("hbm", "headroom", "arguments"):
            lines.append(f"  {name:<24}{_gib(value)}")
    lines.append(
        f"  {'of HBM':<24}{_gib(memory['hbm'])}   headroom {memory['headroom']:.0%}"
        + ("" if report["fits"] else "   DOES NOT FIT")
    )
    flops = report["flops"]
    lines += [
        "",
        f"FLOPs per device: ours {flops['ours_per_device']:.3e}, "
        f"XLA's {flops['xla_per_device']:.3e}",
        "collectives per step (per device; loops counted by trip count):",
    ]
    for c in report["collectives"]:
        axes = ",".join(c["axes"]) if c["axes"] is not None else "?"
        lines.append(f"  {c['kind']:<20} over {axes or '-':<20} x{c['count']:<6}{_gib(c['bytes'])}")
    r = report["roofline"]
    lines += [
        "",
        f"roofline BOUND per step: {r['step_s_bound'] * 1e3:.2f} ms ({r['limited_by']}); "
        f"compute {r['compute_s'] * 1e3:.2f} ms, HBM {r['hbm_s'] * 1e3:.2f} ms, "
        f"collectives {r['collectives_s'] * 1e3:.2f} ms",
        f"MFU at the bound: {report['mfu_bound']:.0%}" if report["mfu_bound"] else "",
        f"chip: {report['chip']['kind']}, {report['chip']['peak_bf16_tflops']:.0f} TFLOP/s, "
        f"{report['chip']['hbm_gib']:.0f} GiB at {report['chip']['hbm_gb_per_s']:.0f} GB/s, "
        f"ICI {report['chip']['ici_gb_per_s']:.0f} GB/s ({report['chip']['source']})",
    ]
    return "\n".join(line for line in lines if line is not None)


def _advice(report: dict) -> list[str]:
    oom = report["out_of_memory"]
    advice = []
    shards = math.prod(report["mesh"][a] for a in sharding.BATCH_AXES)
    rows = report["batch_size"] // report["grad_accum_steps"]
    if rows < shards:
        advice.append(
            f"a micro-batch of {rows} rows cannot split over the {shards} batch shards (its "
            "activations are replicated): fewer micro-batches or a larger batch"
        )
    temporaries = oom["temporaries"] or 0.0
    if temporaries > sum(oom["arguments"].values()):
        if report["remat_policy"] != "full":
            advice.append("--config.model.remat_policy=full (keeps only block inputs)")
        more = 2 * report["grad_accum_steps"]
        if report["step"] == "train" and report["batch_size"] // more >= shards:
            advice.append(f"more micro-batches: --config.grad_accum_steps={more}")
        advice.append("a smaller --config.batch_size or --config.seq_len")
    advice.append(
        "more devices on fsdp / expert (a larger slice, or --sweep to find a mesh that fits)"
    )
    return advice


def candidate_meshes(
    devices: int, experts: int, kv_heads: int, batch: int | None = None
) -> list[dict]:
    """(data, fsdp, expert, tensor) factorizations of `devices` that divide the model: expert
    divides the experts, tensor the KV heads, and a training `batch` splits over data x fsdp x
    expert (generation replicates what does not split, so it passes None)."""
    out = []
    for expert, tensor in itertools.product(range(1, experts + 1), range(1, kv_heads + 1)):
        if experts % expert or kv_heads % tensor or devices % (expert * tensor):
            continue
        rest = devices // (expert * tensor)
        for data in (d for d in range(1, rest + 1) if rest % d == 0):
            fsdp = rest // data
            if batch is None or batch % (data * fsdp * expert) == 0:
                out.append({"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor})
    return out


def _meshes(devices: int, model, batch: int | None) -> list[dict]:
    """Candidate meshes, parameters sharded widest first (fewest data replicas, then the least
    tensor parallelism, then the most expert parallelism)."""
    return sorted(
        candidate_meshes(devices, model.moe_num_experts, model.kv_n_heads, batch),
        key=lambda m: (m["data"], m["tensor"], -m["expert"]),
    )


def sweep(
    config: ml_collections.ConfigDict,
    target: Target,
    step: str = "train",
    *,
    remat_policies=("full", "dots_no_batch", "none"),
    micro_batches=(1, 2, 4),
    limit: int = 12,
) -> list[dict]:
    """Compiles the candidate meshes (fewest data-parallel replicas first: parameters sharded
    widest), remat policies and micro-batch counts, at most `limit` compiles; returns the
    reports that fit, best roofline bound first."""
    model = experiment.model_config(config.model)
    meshes = _meshes(len(target.devices()), model, config.batch_size if step == "train" else None)
    remats = remat_policies if step == "train" else (model.remat_policy,)
    counts = [m for m in micro_batches if step == "train" and config.batch_size % m == 0] or [1]
    results = []
    for mesh, remat, micro in itertools.islice(itertools.product(meshes, remats, counts), limit):
        trial = _trial(config, mesh, remat, micro)
        try:
            report = compile_report(trial, target, step)
        except ValueError as e:  # a mesh the batch or model cannot use
            log.info("sweep: %s %s x%d skipped: %s", mesh, remat, micro, e)
            continue
        log.info("sweep: %s %s x%d: %s", mesh, remat, micro, "fits" if report["fits"] else "no fit")
        if report["fits"]:
            results.append(report)
    return sorted(results, key=lambda r: r["roofline"]["step_s_bound"])


def fits_summary(reports: list[dict]) -> str:
    if not reports:
        return "no candidate fits; try a larger slice"
    rows = ["mesh (data,fsdp,expert,tensor)  remat          micro  bound ms  headroom  MFU bound"]
    for r in reports:
        mesh = ",".join(str(r["mesh"][a]) for a in sharding.MESH_AXES)
        rows.append(
            f"{mesh:<32}{r['remat_policy']:<15}{r['grad_accum_steps']:<7}"
            f"{r['roofline']['step_s_bound'] * 1e3:<10.2f}{r['memory']['headroom']:<10.0%}"
            f"{(r['mfu_bound'] or math.nan):.0%}"
        )
    return "\n".join(rows)


def _trial(config: ml_collections.ConfigDict, mesh: dict, remat=None, micro=None):
    """`config` on `mesh`, with this remat policy and micro-batch count if given."""
    trial = config.copy_and_resolve_references()
    trial.unlock()
    trial.mesh.update(mesh)
    if remat is not None:
        trial.model.remat_policy = remat
    if micro is not None:
        trial.grad_accum_steps = micro
    trial.lock()
    return trial


def _micro_batches(batch: int, mesh: dict) -> list[int]:
    """Micro-batch counts whose micro-batches still split over every batch shard, most first
    (fewest activation bytes)."""
    shards = math.prod(mesh[a] for a in sharding.BATCH_AXES)
    return [m for m in range(batch, 0, -1) if batch % m == 0 and (batch // m) % shards == 0]


def smallest_slice(
    config: ml_collections.ConfigDict,
    generation: str,
    step: str = "train",
    num_slices: int = 1,
    *,
    meshes_per_slice: int = 4,
) -> list[dict]:
    """Walks `generation`'s slices from the smallest and stops at the first that holds `step`.

    On each slice it tries up to `meshes_per_slice` candidate meshes (parameters sharded widest
    first), each at its lightest setting: full remat and the most micro-batches that still split
    over the batch shards (train), or the config's own (prefill, decode). A mesh whose arguments
    alone (parameters, optimizer state, batch or KV cache, as sharded) exceed the HBM is ruled
    out without compiling. Returns one row per slice tried: `slice`, `chips`, `verdict`
    ("fits", "out of memory", "arguments exceed HBM", "no mesh", "not described by libtpu"),
    the per-device bytes `needed`
    of the closest attempt, `hbm`, and `report` (the fitting compile's report, or the closest
    out-of-memory one). The fitting slice's mesh is not tuned for speed: `sweep` it next."""
    model = experiment.model_config(config.model)
    rows = []
    for target in slice_targets(generation, num_slices):
        row = {"slice": target.name, "chips": target.chips, "verdict": "no mesh"}
        row.update(needed=None, report=None, hbm=None)
        try:
            devices = len(target.devices())
        except ValueError as e:  # a torus libtpu does not describe
            log.info("slice search: %s skipped: %s", target.name, e)
            row["verdict"] = "not described by libtpu"
            rows.append(row)
            continue
        row["hbm"] = float(target.hbm_per_device)
        meshes = _meshes(devices, model, config.batch_size if step == "train" else None)
        for mesh in meshes[:meshes_per_slice]:
            if step == "train":
                trial = _trial(config, mesh, "full", _micro_batches(config.batch_size, mesh)[0])
            else:
                trial = _trial(config, mesh)
            try:
                built = build_program(trial, target, step)
            except ValueError as e:  # a mesh the model or batch cannot use
                log.info("slice search: %s %s skipped: %s", target.name, mesh, e)
                continue
            arguments = float(analysis.device_bytes(built[0].args))
            if arguments > target.hbm_per_device:
                if row["needed"] is None or arguments < row["needed"]:
                    row.update(verdict="arguments exceed HBM", needed=arguments)
                log.info(
                    "slice search: %s %s: arguments alone %.1f GiB per device",
                    target.name,
                    mesh,
                    arguments / GiB,
                )
                continue
            report = compile_report(trial, target, step, built=built)
            # Compiled but over HBM ("memory"), or stopped by the compiler ("out_of_memory").
            if "memory" in report:
                needed = report["memory"]["total"]
            else:
                needed = report["out_of_memory"]["needed"]
            log.info(
                "slice search: %s %s: %s (%.1f GiB per device)",
                target.name,
                mesh,
                "fits" if report["fits"] else "out of memory",
                needed / GiB,
            )
            if report["fits"]:
                row.update(verdict="fits", needed=needed, report=report)
                break
            if row["verdict"] != "out of memory" or needed < row["needed"]:
                row.update(verdict="out of memory", needed=needed, report=report)
        rows.append(row)
        if row["verdict"] == "fits":
            break
    return rows


def slices_summary(rows: list[dict]) -> str:
    """The slice search as a table; the last line names the smallest slice that fits."""
    lines = ["slice        chips  verdict                   needs per device       mesh"]
    for r in rows:
        need = f"{r['needed'] / GiB:.1f} of {r['hbm'] / GiB:.0f} GiB" if r["needed"] else "-"
        lines.append(f"{r['slice']:<13}{r['chips']:<7}{r['verdict']:<26}{need:<23}{_mesh(r)}")
    best = rows[-1] if rows and rows[-1]["verdict"] == "fits" else None
    if best:
        report = best["report"]
        train = (
            f", remat {report['remat_policy']}, micro-batches {report['grad_accum_steps']}"
            if report["step"] == "train"
            else ""
        )
        lines.append(
            f"smallest slice: {best['slice']} (mesh data,fsdp,expert,tensor = {_mesh(best)}"
            f"{train}, headroom {report['memory']['headroom']:.0%}); "
            f"--sweep --topology={best['slice']} tunes it"
        )
    else:
        lines.append("no slice of this generation holds it")
    return "\n".join(lines)


def _mesh(row: dict) -> str:
    report = row["report"]
    return ",".join(str(report["mesh"][a]) for a in sharding.MESH_AXES) if report else "-"
