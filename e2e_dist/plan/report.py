"""The `plan` verb: a config + hardware -> the options table and the recommended setting; and the
same check at the start of `train` on GPU (`check_fits_on_gpu`)."""

from __future__ import annotations

from functools import partial

import torch

from e2e_dist.config import RunConfig
from e2e_dist.errors import ConfigError
from e2e_dist.plan.activations import gpt_activation_bytes, measured_activation_bytes
from e2e_dist.plan.comm import INTERCONNECTS, default_interconnect, model_trace
from e2e_dist.plan.memory import LAYOUTS, GiB, Layout, largest_layer_params
from e2e_dist.plan.recommend import (
    DEFAULT_MFU,
    HEADROOM,
    RESERVED_GIB,
    Hardware,
    ModelShape,
    Option,
    Plan,
    make_plan,
    refuse_if_too_big,
)

GPU_MEMORY_GIB: list[tuple[str, float]] = [
    ("H200", 141), ("GH200", 96), ("H100", 80), ("B200", 180), ("A100-SXM4-40GB", 40), ("A100-PCIE-40GB", 40),
    ("A100", 80), ("A10G", 24), ("A10", 24), ("L40S", 48), ("L4", 24), ("RTX 4090", 24), ("V100", 32), ("T4", 16),
]
"""Memory of common cards (GiB as sold), matched by substring like flops.PEAK_FLOPS_BF16."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hardware(*, gpu: str = "H100", gpus_per_node: int = 1, nodes: int = 1, gpu_mem_gib: float | None = None,
             mfu: float = DEFAULT_MFU, interconnect: str | None = None) -> Hardware:
    from e2e_dist.train.flops import PEAK_FLOPS_BF16, peak_flops_of

    peak = peak_flops_of(gpu)
    if peak is None:
        raise ConfigError(f"--gpu {gpu!r}: unknown card (known: {', '.join(k for k, _ in PEAK_FLOPS_BF16)})")
    if gpu_mem_gib is None:
        gpu_mem_gib = next(m for key, m in GPU_MEMORY_GIB if key.lower() in gpu.lower())
    if interconnect is not None and interconnect not in INTERCONNECTS:
        raise ConfigError(f"--interconnect {interconnect!r}: one of {', '.join(INTERCONNECTS)}")
    # Default: what the card's AWS instance type brings (EFA on p4d/p5/p6; TCP on g5/g6)
    return Hardware(gpus_per_node=gpus_per_node, nodes=nodes, gpu_mem_gib=gpu_mem_gib, gpu_name=gpu,
                    peak_flops=peak, mfu=mfu, interconnect=interconnect or default_interconnect(gpu))


def shape_of(cfg: RunConfig, precision: str) -> ModelShape:
    """Sizes, FLOPs and the activation model of cfg's model, without allocating its weights (built
    on 'meta'; the models' own FLOP counts, train/flops.py)."""
    from e2e_dist.models.registry import build_model

    m = cfg.model
    with torch.device("meta"):
        model = build_model(m, cfg.data)
    flops, n_params, largest = model.train_flops(1), model.num_params(), largest_layer_params(model)
    trace = model_trace(model)
    if m.kind == "gpt":
        s = cfg.data.seq_len
        act = partial(_gpt_activations, m, s, 2 if precision in ("bf16", "fp16") else 4)
        return ModelShape(name=cfg.name, n_params=n_params, largest_layer=largest, flops_per_example=flops,
                          units_per_example=s, unit_name="tokens", precision=precision, activations=act, trace=trace)
    # convolutional / audio presets are small enough to measure their activations on CPU
    act = partial(_measured_activations, partial(build_model, m, cfg.data), DTYPES[precision])
    return ModelShape(name=cfg.name, n_params=n_params, largest_layer=largest, flops_per_example=flops,
                      units_per_example=1, unit_name="samples", precision=precision, activations=act, trace=trace)


def _gpt_activations(m, seq, act_bytes, micro_batch, checkpointing):
    from e2e_dist.models.gpt import VOCAB_SIZE

    return gpt_activation_bytes(n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head, vocab=VOCAB_SIZE,
                                batch=micro_batch, seq=seq, act_bytes=act_bytes, checkpointing=checkpointing)


_measured_cache: dict = {}


def _measured_activations(build, dtype, micro_batch, checkpointing):
    key = (repr(build.args), dtype, checkpointing)
    if key not in _measured_cache:  # measured once at batch 1 on a real model; linear in the batch
        _measured_cache[key] = measured_activation_bytes(build(), batch=1, dtype=dtype, checkpointing=checkpointing)
    one = _measured_cache[key]
    return type(one)(stored=one.stored * micro_batch, working=one.working * micro_batch)


def global_batch_of(cfg: RunConfig, world: int) -> int:
    t = cfg.trainer
    return t.global_batch_size or t.micro_batch_size * t.grad_accum * world


def plan_for(cfg: RunConfig, hw: Hardware, layouts=LAYOUTS) -> Plan:
    from e2e_dist.train.deepspeed_config import resolve_precision

    return plan_of_shape(shape_of(cfg, resolve_precision(cfg, on_gpu=True)), cfg, hw, layouts)


def plan_of_shape(shape: ModelShape, cfg: RunConfig, hw: Hardware, layouts=LAYOUTS) -> Plan:
    from e2e_dist.train.deepspeed_config import reduce_bucket_elements

    return make_plan(shape, hw, global_batch_of(cfg, hw.world), layouts=layouts,
                     reduce_bucket=reduce_bucket_elements(shape.n_params))


def layout_of(cfg: RunConfig) -> Layout:
    ds = cfg.deepspeed
    return Layout(zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer, offload_params=ds.offload_params)


def configured_option(plan: Plan, cfg: RunConfig) -> Option:
    """The option the config itself asks for (its layout, micro-batch and checkpointing)."""
    t = cfg.trainer
    want = layout_of(cfg)
    found = [o for o in plan.options if o.layout == want and o.micro_batch == t.micro_batch_size
             and o.checkpointing == t.activation_checkpointing]
    if found:
        return found[0]
    extra = plan_of_shape(plan.shape, cfg, plan.hardware, layouts=(want,))  # the same bucket cap as the plan
    per_rank = plan.global_batch // plan.hardware.world
    return next((o for o in extra.options if o.micro_batch == min(t.micro_batch_size, per_rank)
                 and o.checkpointing == t.activation_checkpointing), extra.options[0])


def _size_unit(plan: Plan) -> tuple[str, float]:
    """GiB, or MiB when every total is below 1 GiB (small models read as 0.00 GiB otherwise)."""
    return ("GiB", GiB) if max(o.gpu_bytes for o in plan.options) >= GiB else ("MiB", 1024**2)


def format_plan(plan: Plan, cfg: RunConfig, config_label: str) -> str:
    hw, shape = plan.hardware, plan.shape
    unit_name, unit_bytes = _size_unit(plan)

    def size(b: float) -> str:
        return f"{b / unit_bytes:6.2f}"
    unit = f" x {shape.units_per_example} {shape.unit_name}" if shape.units_per_example > 1 else f" {shape.unit_name}"
    lines = [
        f"plan: {config_label}: {shape.n_params / 1e6:.1f}M parameters (largest layer {shape.largest_layer / 1e6:.2f}M), "
        f"{shape.precision}, global batch {plan.global_batch}{unit}",
        f"on {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) = {hw.world}, {hw.gpu_mem_gib:g} GiB each "
        f"({plan.options[0].usable_bytes / GiB:.1f} GiB usable: {RESERVED_GIB:g} GiB reserved, {HEADROOM:.0%} headroom), "
        f"{hw.gpu_name} peak {hw.peak_flops / 1e12:.0f} TFLOP/s at MFU {hw.mfu:.0%}",
        _links_line(hw), "", *_table(plan, size, unit_name), "",
    ]
    best, mine = plan.best, configured_option(plan, cfg)
    if best is None:
        lines.append(f"nothing fits {hw.gpu_mem_gib:g} GiB per GPU: add GPUs (--gpus/--nodes) or shrink the model")
    else:
        t = best.time
        lines += [
            f"recommended: {best.layout.label}, micro-batch {best.micro_batch} x grad accumulation {best.grad_accum}, "
            f"activation checkpointing {'on' if best.checkpointing else 'off'}: {size(best.gpu_bytes).strip()} {unit_name} per GPU; "
            f"~{best.step_s:.2g} s per step (compute {t.compute:.2g}, collectives {t.intra + t.inter:.2g}, offload "
            f"{t.offload:.2g}), ~{best.units_s:,.0f} {shape.unit_name}/s",
            (f"  e2e-dist train {config_label} {changes}" if (changes := best.set_args(mine.settings()))
             else "  the config as written is this setting"),
        ]
    lines.append(f"the config as written ({mine.layout.label}, micro-batch {mine.micro_batch}, checkpointing "
                 f"{'on' if mine.checkpointing else 'off'}): {size(mine.gpu_bytes).strip()} {unit_name} per GPU, "
                 f"{'fits' if mine.fits else 'does NOT fit'}, ~{mine.step_s:.2g} s per step")
    lines.append("estimates: model states by DeepSpeed's accounting (its own estimators for ZeRO-2/3: "
                 + ", ".join(f"{o.layout.label} {o.states.deepspeed_gpu / GiB:.2f}" for o in _one_per_layout(plan)
                             if o.states.deepspeed_gpu is not None)
                 + " GiB, buckets excluded); step time = FLOPs at the MFU + DeepSpeed's collectives per step "
                   "(GB/step: payload per rank) + offload traffic, not overlapped")
    return "\n".join(lines)


def _links_line(hw: Hardware) -> str:
    intra, inter = hw.links()
    across = f"; across nodes {hw.interconnect} {inter / 1e9:g} GB/s per node" if hw.nodes > 1 else ""
    return (f"links (plan/comm.py, `e2e-dist cluster check` measures them): inside a node {intra / 1e9:g} GB/s "
            f"per GPU{across}; collectives hierarchical, as DeepSpeed 0.19.8 schedules them")


def _table(plan: Plan, size, unit_name: str) -> list[str]:
    """Per layout and checkpointing: the fastest fitting micro-batch (else the smallest), with the
    step time split into compute, collectives inside / across nodes and offload."""
    shape = plan.shape
    lines = [f"{'layout':28} {'micro':>5} {'accum':>5} {'ckpt':>4} | {unit_name} per GPU: {'params':>6} {'grads':>6} "
             f"{'optim':>6} {'buffer':>6} {'activ':>6} {'total':>6} | {'fits':4} {'step s':>6} = {'comp':>5} + "
             f"{'intra':>5} + {'inter':>5} + {'offl':>5} {'GB/step':>7} {shape.unit_name + '/s':>12}  host GiB/node"]
    for layout in LAYOUTS:
        for ckpt in (False, True):
            rows = [o for o in plan.options if o.layout == layout and o.checkpointing == ckpt]
            fitting = [o for o in rows if o.fits]
            o = min(fitting, key=lambda r: (round(r.step_s, 6), -r.micro_batch)) if fitting else \
                min(rows, key=lambda r: r.micro_batch)
            s, t = o.states, o.time
            mark = "*" if o is plan.best else " "
            lines.append(
                f"{mark}{layout.label:27} {o.micro_batch:5} {o.grad_accum:5} {'on' if ckpt else 'off':>4} |              "
                f"{size(s.params)} {size(s.grads)} {size(s.optimizer)} {size(s.buffers)} {size(o.activations.peak)} "
                f"{size(o.gpu_bytes)} | {'yes' if o.fits else 'NO':4} {o.step_s:6.2f} = {t.compute:5.2f} + "
                f"{t.intra:5.2f} + {t.inter:5.2f} + {t.offload:5.2f} {t.comm_bytes / 1e9:7.2f} {o.units_s:12,.0f}  "
                f"{s.cpu_per_node / GiB:6.1f}")
    return lines


def _one_per_layout(plan: Plan) -> list[Option]:
    seen, out = set(), []
    for o in plan.options:
        if o.layout not in seen:
            seen.add(o.layout)
            out.append(o)
    return out


def plan_cli(args) -> int:
    from e2e_dist.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    hw = hardware(gpu=args.gpu, gpus_per_node=args.gpus, nodes=args.nodes, gpu_mem_gib=args.gpu_mem, mfu=args.mfu,
                  interconnect=getattr(args, "interconnect", None))
    print(format_plan(plan_for(cfg, hw), cfg, args.config))
    return 0


def check_fits_on_gpu(cfg: RunConfig, *, world: int, device: torch.device) -> None:
    """At the start of `train` on a GPU: refuse a setting that cannot fit this card, naming the fix."""
    from e2e_dist.train.flops import peak_flops

    props = torch.cuda.get_device_properties(device)
    hw = Hardware(gpus_per_node=world, nodes=1, gpu_mem_gib=props.total_memory / GiB, gpu_name=props.name,
                  peak_flops=peak_flops(device) or 989e12)
    # Every rank runs this at start: cost the configured layout only, the others only to name a fix.
    own = plan_for(cfg, hw, layouts=(layout_of(cfg),))
    mine = configured_option(own, cfg)
    if not mine.fits:
        refuse_if_too_big(plan_of_shape(own.shape, cfg, hw), mine, cfg.name)
