"""The registered backends: each turns a job into its declared stages (see spine.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from raypipe.pipeline.live import Reporter
from raypipe.pipeline.plan import InferPlan
from raypipe.pipeline.spine import Resources, Stage, backend
from raypipe.pipeline.stages import (
    MODEL_STAGES,
    SUMMARY_COLUMNS,
    CaptureSink,
    CaptureStage,
    FusedStage,
    GenerateStage,
    ProjectionSink,
    ProjectStage,
    ResponseSource,
    write_projections,
    write_responses,
)
from raypipe.store.outputs import VectorInfo

WRITER_CPUS = 0.1  # writers wait on the disk, not the CPU


@dataclass(frozen=True)
class Job:
    """A validated plan made concrete: which stages run, with what resources, decided once."""

    plan: InferPlan
    mode: str  # "generate", "stream" (generate + project), "capture", "from_activations"
    gpus: float  # per model actor: --gpus-per-replica, else 1 when the cluster shows GPUs
    generates: bool  # some row needs a response generated
    served: str | None = None  # the model server that holds the model (--backend auto)
    progress: Reporter | None = None  # where the stages report how far they got (live.py)

    @property
    def cpus(self) -> float:
        # Fractional on CPU nodes: two pools fit on a 2-core machine.
        return 1.0 if self.gpus else 0.5

    @property
    def then(self) -> str | None:
        """The model stage after generation: "project", "capture", or None."""
        return {"generate": None, "capture": "capture"}.get(self.mode, "project")

    def generate_args(self) -> dict:
        p, opts, run = self.plan, self.plan.opts, self.plan.opts.run
        return dict(
            spec=p.model.spec,
            opts=opts.generation,
            chat_config=p.config.use_chat_template,
            context=p.model.context,
            truncate=opts.output.truncate,
            source=self.source(),
            threads=run.threads,
            backend="vllm" if run.backend == "vllm" else "local",
            tensor_parallel_size=run.tensor_parallel_size,
            progress=self.progress,
        )

    def then_args(self) -> dict:
        """Constructor kwargs of the model stage after generation: what Ray gives each actor
        (and again to one it restarts): options and file paths, a few KB whatever the model
        size; vectors are loaded in the actor."""
        p, opts, run = self.plan, self.plan.opts, self.plan.opts.run
        if self.then == "capture":
            return dict(
                spec=p.model.spec,
                layers=sorted({v.layer for v in p.vectors}),
                max_batch_tokens=opts.projection.max_batch_tokens,
                compile_prefill=opts.projection.compile_prefill,
                sink=CaptureSink(p.paths, p.variant, opts.projection.component),
                threads=run.threads,
                progress=self.progress,
            )
        # SPEC 8: the first run of a variant collects calibration passively; the plan decided
        # whether this one does, and which prompts it sends through for it.
        return dict(
            spec=p.model.spec,
            vectors=p.vectors,
            component=opts.projection.component,
            massive_dims=p.massive_dims,
            max_batch_tokens=opts.projection.max_batch_tokens,
            early_stop=opts.projection.early_stop,
            threads=run.threads,
            calibration=p.calibration,
            compile_prefill=opts.projection.compile_prefill,
            progress=self.progress,
        )

    def source(self) -> ResponseSource:
        p = self.plan
        return ResponseSource(p.paths, p.variant, p.model.spec.model, p.opts.output.json)

    def model_resources(self, replicas: int, gpus: float | None = None) -> Resources:
        gpus = self.gpus if gpus is None else gpus
        batch = self.plan.opts.run.batch_size
        return Resources(self.cpus, gpus, replicas=replicas, batch_size=batch)


def backend_for(job: Job) -> str:
    """The one place the job's shape is chosen."""
    run = job.plan.opts.run
    if job.mode == "from_activations":
        return "saved"
    if job.served is not None:
        return "served"
    if run.tp > 1 and job.then == "project":
        return "tp"
    if run.backend == "vllm":
        return "vllm"
    return "local"


# ---------------------------------------------------------------- stages every backend shares


def generate_stage(job: Job, run=GenerateStage, args=None, gpus: float | None = None) -> Stage:
    """Generation for the rows that need it (the rest load their response file); with no row
    to generate, one actor that asks for no device."""
    opts = job.plan.opts.run
    if job.generates:
        resources = job.model_resources(opts.generate_replicas, gpus)
    else:
        resources = job.model_resources(1, 0.0)
    args = job.generate_args() if args is None else args
    return Stage("generate", run, args, GenerateStage.NEEDS, GenerateStage.PRODUCES, resources)


def response_writer(job: Job) -> Stage:
    return Stage(
        "write_responses",
        write_responses,
        {"source": job.source()},
        GenerateStage.PRODUCES,
        GenerateStage.PRODUCES,
        Resources(WRITER_CPUS),
    )


def _then_columns(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if kind == "capture":
        return CaptureStage.NEEDS, SUMMARY_COLUMNS
    return ProjectStage.NEEDS, GenerateStage.PRODUCES + ProjectStage.SCORE_COLUMNS


def then_stage(job: Job, run=None, args=None, resources: Resources | None = None) -> Stage:
    """The model stage after generation (projection or capture)."""
    needs, produces = _then_columns(job.then)
    return Stage(
        job.then,
        run or MODEL_STAGES[job.then],
        job.then_args() if args is None else args,
        needs,
        produces,
        resources or job.model_resources(job.plan.opts.run.project_replicas),
    )


def projection_writer(job: Job) -> list[Stage]:
    """The projection writer, for jobs that project (a capture stage writes its own files)."""
    if job.then != "project":
        return []
    p, proj = job.plan, job.plan.opts.projection
    sink = ProjectionSink(
        paths=p.paths,
        variant=p.variant,
        vectors=tuple(
            VectorInfo(v.trait, v.method, v.position, v.layer, v.selection_source, v.baseline)
            for v in p.vectors
        ),
        component=proj.component,
        centered=proj.centered,
        force=p.opts.output.force,
        massive_dims=p.massive_dims,
        json=p.opts.output.json,
    )
    needs = ("prompt_set", "prompt_id", "prompt_end", "generated") + ProjectStage.SCORE_COLUMNS
    return [
        Stage(
            "write_projections",
            write_projections,
            {"sink": sink},
            needs,
            SUMMARY_COLUMNS,
            Resources(WRITER_CPUS),
        )
    ]


def _split(job: Job, generate: Stage, then: Stage | None) -> list[Stage]:
    """Generation and the model stage in pools of their own, responses written between."""
    stages = [generate, response_writer(job)]
    if then is not None:
        stages += [then, *projection_writer(job)]
    return stages


# ---------------------------------------------------------------- the backends


@backend("local")
def local(job: Job) -> list[Stage]:
    """HF generation and the prefill on one model in one actor per replica: the prefill
    costs a few percent of generation, so a second actor would only contend for the same
    device (or ask for a second GPU) and hold a second copy of the model."""
    if job.then is None:
        return [generate_stage(job), response_writer(job)]
    run = job.plan.opts.run
    args = dict(
        generate=job.generate_args(),
        then=job.then,
        then_kwargs=job.then_args(),
        threads=run.threads,
    )
    fused = Stage(
        "fused",
        FusedStage,
        args,
        GenerateStage.NEEDS,
        _then_columns(job.then)[1],
        job.model_resources(run.generate_replicas),
    )
    return [fused, *projection_writer(job)]


@backend("vllm")
def vllm(job: Job) -> list[Stage]:
    """One vLLM engine per replica (tensor_parallel_size GPUs, or on CPU as many ranks with
    cores of their own) generates and projects (or captures) in the same forward passes, hooks
    inside its model: one model copy (generation alone: no hooks). Several Ray blocks are in
    flight on each engine (an async stage, VLLMStage)."""
    from raypipe.pipeline.vllm_stage import BLOCKS_IN_FLIGHT, VLLMStage

    run = job.plan.opts.run
    tp = run.tensor_parallel_size
    gpus = job.gpus * tp
    # On CPU each rank counts as a model actor does (fractional: the writers still fit).
    cpus = job.cpus if job.gpus else job.cpus * tp
    args = dict(generate=job.generate_args(), blocks=BLOCKS_IN_FLIGHT)
    if job.then is not None:
        args[job.then] = job.then_args()  # "project" or "capture"
    produces = {"capture": VLLMStage.CAPTURE_PRODUCES, None: GenerateStage.PRODUCES}.get(
        job.then, VLLMStage.PRODUCES
    )
    resources = replace(
        job.model_resources(run.generate_replicas, gpus),
        num_cpus=cpus,
        max_concurrency=BLOCKS_IN_FLIGHT,
    )
    stage = Stage("vllm", VLLMStage, args, VLLMStage.NEEDS, produces, resources)
    return [stage, *projection_writer(job)]


@backend("tp")
def tensor_parallel(job: Job) -> list[Stage]:
    """HF generation, then per projection replica a gang of `tp` rank actors; the stage
    itself only coordinates (its ranks hold the devices)."""
    from raypipe.pipeline.tp_stage import TPProjectStage

    run = job.plan.opts.run
    args = dict(job.then_args(), tp=run.tp, gpus_per_rank=1 if job.gpus else 0)
    coordinator = Resources(0.1, 0.0, replicas=run.project_replicas, batch_size=run.batch_size)
    return _split(job, generate_stage(job), then_stage(job, TPProjectStage, args, coordinator))


@backend("served")
def served(job: Job) -> list[Stage]:
    """The model server holds the model and the device; forwarders, which need neither,
    run its copies of the stages (ServedStage)."""
    from raypipe.pipeline.server import ServedStage

    run = job.plan.opts.run

    def forwarder(stage: Stage, replicas: int) -> Stage:
        args = dict(server=job.served, kind=stage.name, stage_kwargs=stage.args)
        res = Resources(0.1, 0.0, replicas=replicas, batch_size=run.batch_size)
        return Stage(stage.name, ServedStage, args, stage.needs, stage.produces, res)

    gen = forwarder(generate_stage(job), run.generate_replicas if job.generates else 1)
    then = forwarder(then_stage(job), run.project_replicas) if job.then else None
    return _split(job, gen, then)


@backend("saved")
def saved(job: Job) -> list[Stage]:
    """--from-activations: saved raw captures scored with the projector's math; no model."""
    from raypipe.fromacts import SavedActivationsStage

    p, run = job.plan, job.plan.opts.run
    args = dict(
        paths=p.paths,
        variant=p.variant,
        component=p.opts.projection.component,
        vectors=p.vectors,
        massive_dims=p.massive_dims,
        progress=job.progress,
    )
    scorer = Stage(
        "from_activations",
        SavedActivationsStage,
        args,
        SavedActivationsStage.NEEDS,
        SavedActivationsStage.PRODUCES,
        Resources(job.cpus, 0.0, replicas=run.project_replicas, batch_size=run.batch_size),
    )
    return [scorer, *projection_writer(job)]
